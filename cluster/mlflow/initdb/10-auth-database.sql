-- The basic-auth app's users and permissions get a database of their own beside the tracking
-- store's (basic_auth.ini points at it). PostgreSQL runs this once, when its volume is empty.
CREATE DATABASE mlflow_auth;

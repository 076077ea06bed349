"""A plain, per-example reference of T5's span corruption (as in t5.data.preprocessors), written for
clarity, not speed. It draws the same numbers as the fast path (the counter-based keys of
jobs/data/randomness.py); jobs/data/spans.py must match it exactly."""

import numpy as np

from jobs.data import randomness


def reference_noise_mask(length, rate, mean_span, seed, index):
    num_noise = min(max(int(round(length * rate)), 1), length - 1)
    num_spans = min(max(int(round(num_noise / mean_span)), 1), length - num_noise)

    def segmentation(num_items, num_segments, stream):
        # T5 shuffles an indicator of which gaps start a new segment; we pick the gaps whose keys are smallest.
        gap_keys = randomness.keys(seed, np.array([index]), stream, num_items - 1)[0]
        chosen = set(np.argsort(gap_keys, kind="stable")[:num_segments - 1].tolist())
        first_in_segment = [0] + [1 if gap in chosen else 0 for gap in range(num_items - 1)]
        segment_id = np.cumsum(first_in_segment)
        _, segment_length = np.unique(segment_id, return_counts=True)
        return segment_length

    noise_lengths = segmentation(num_noise, num_spans, randomness.NOISE_CUTS)
    keep_lengths = segmentation(length - num_noise, num_spans, randomness.KEEP_CUTS)
    interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, dtype=int)
    indicator[span_starts] = 1
    return np.cumsum(indicator) % 2 == 1


def reference_corrupt(tokens, rate, mean_span, sentinels, seed, index):
    mask = reference_noise_mask(len(tokens), rate, mean_span, seed, index)
    inputs, targets, used = [], [], 0
    for i, token in enumerate(tokens):
        if mask[i]:
            if i == 0 or not mask[i - 1]:
                inputs.append(sentinels[used])
                targets.append(sentinels[used])
                used += 1
            targets.append(token)
        else:
            inputs.append(token)
    return np.array(inputs, dtype=np.int32), np.array(targets, dtype=np.int32)

"""pairing/copies.find_candidates with neighbour searches that find nothing (two unrelated images):
no candidates, not an IndexError that fails the whole pair stage (found by issue 32's planted web)."""

import numpy as np


def test_no_candidate_pairs_is_an_empty_list():
    from core.config import PairConfig
    from pairing.copies import find_candidates

    assert find_candidates(["a", "b"], np.eye(2, dtype=np.float32), ["0" * 16, "f" * 16], PairConfig()) == []

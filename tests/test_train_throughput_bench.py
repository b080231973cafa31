"""bench/train_throughput.py's reporting: the plot names each length by its rows' own stage."""

from bench.train_throughput import length_labels


def test_lengths_are_named_by_their_rows_stage_whatever_cases_ran():
    both = [{"seq_len": 32768, "stage": "stage3"}, {"seq_len": 8192, "stage": "stage2"}]
    assert length_labels(both) == ["Stage II 8K", "Stage III 32K"]
    assert length_labels([{"seq_len": 32768, "stage": "stage3"}]) == ["Stage III 32K"]  # `--cases stage3` alone

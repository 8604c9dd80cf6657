import dataclasses

import pytest

from pqflex import Budget, PQConfig
from pqflex.config import DENSE_WINDOW


def test_defaults_are_the_measured_quality_setting():
    cfg = PQConfig()
    assert (cfg.M, cfg.nbits, cfg.sink_size, cfg.budget, cfg.recent_ratio) == (8, 8, 32, 0.1, 0.5)
    assert (cfg.ksub, cfg.niter, cfg.train_points, cfg.backend) == (256, 10, 64, "fused")


def test_frozen_and_replace_validates():
    cfg = PQConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.M = 4
    assert cfg.replace(M=4).M == 4
    with pytest.raises(ValueError, match="nbits"):
        cfg.replace(nbits=9)


@pytest.mark.parametrize("field,value,match", [
    ("M", 0, r"PQConfig.M=0 .*>= 1"),
    ("M", 2.0, r"PQConfig.M must be an int"),
    ("M", True, r"PQConfig.M must be an int"),
    ("nbits", 0, r"PQConfig.nbits=0 .*\[1, 8\]"),
    ("nbits", 9, r"PQConfig.nbits=9 .*\[1, 8\]"),
    ("sink_size", -1, r"PQConfig.sink_size=-1"),
    ("budget", 0.0, r"PQConfig.budget=0.0 .*\(0.0, 1.0\]"),
    ("budget", 1.5, r"PQConfig.budget=1.5"),
    ("budget", 0, r"PQConfig.budget=0 "),
    ("budget", "10%", r"PQConfig.budget must be an int"),
    ("budget", 10, r"PQConfig.budget=10 gives 10 tokens, fewer than sink_size \+ 2 = 34"),
    ("budget", 0.01, r"PQConfig.budget=0.01 gives 10 tokens at min_context=1024"),
    ("recent_ratio", -0.1, r"PQConfig.recent_ratio=-0.1"),
    ("recent_ratio", float("nan"), r"PQConfig.recent_ratio must be a finite number"),
    ("min_context", -5, r"PQConfig.min_context=-5"),
    ("niter", 0, r"PQConfig.niter=0"),
    ("cpu_niter", 0, r"PQConfig.cpu_niter=0"),
    ("cpu_train_points", -1, r"PQConfig.cpu_train_points=-1"),
    ("seed", -1, r"PQConfig.seed=-1"),
    ("tol", -1.0, r"PQConfig.tol=-1.0"),
    ("kmeans_device", "gpu", r"PQConfig.kmeans_device='gpu'.*'auto', 'cpu'"),
])
def test_invalid_values_name_field_and_range(field, value, match):
    with pytest.raises(ValueError, match=match):
        PQConfig(**{field: value})


def test_dense_budget_one_is_valid_with_any_sink():
    assert PQConfig(budget=1.0, sink_size=4096).resolve_budget(100).dense


def test_resolve_ratio_budget_sums_to_budget():
    cfg = PQConfig(budget=0.1)
    b = cfg.resolve_budget(20_000)
    assert b == Budget(32, 984, 984, False)
    assert b.total == 2000


@pytest.mark.parametrize("n", [1024, 1500, 4097, 131_072])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_resolve_total_recent_at_least_one(n, ratio):
    b = PQConfig(budget=0.2, recent_ratio=ratio).resolve_budget(n)
    assert not b.dense
    assert b.total == int(0.2 * n)
    assert b.recent_size >= 1 and b.topk >= 0
    if ratio == 1.0:
        assert b.topk == 0


def test_resolve_dense_cases():
    cfg = PQConfig(budget=0.1, min_context=1024)
    assert cfg.resolve_budget(1023) == Budget(32, DENSE_WINDOW, 0, True)
    tokens = PQConfig(budget=2048, min_context=0)
    assert tokens.resolve_budget(2048).dense
    assert not tokens.resolve_budget(2049).dense
    assert tokens.resolve_budget(100_000).total == 2048


def test_resolve_rejects_bad_context_and_tiny_budget():
    with pytest.raises(ValueError, match="n_ctx"):
        PQConfig().resolve_budget(-1)
    with pytest.raises(ValueError, match=r"gives 0 tokens at min_context=0, fewer than sink_size"):
        PQConfig(budget=0.05, min_context=0)
    cfg = PQConfig(budget=0.05, min_context=680, sink_size=32)  # 34 tokens at 680
    assert cfg.resolve_budget(680).total == 34

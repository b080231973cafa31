"""The run config and the stage plan: everything refused here is refused before any stage runs."""

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.plan import PlanError, check_plan
from pipeline.recipes import RECIPES
from pipeline.stages import STAGE_ORDER

TINY = "configs/tiny.yaml"


def test_shipped_configs_validate():
    tiny = load_config(TINY)
    with pytest.raises(ConfigError, match="data.distill.sources: List should have at least 1 item"):
        load_config(TINY, ["data.distill.sources=[]"])
    assert [s.name for s in load_config("configs/infinitevl_4b.yaml").data.instruct.sources] == [
        "FineVision", "LLaVA-OneVision-Data"]
    paper = load_config("configs/infinitevl_4b.yaml", [f"data.{c}.sources=[s3://b/{c}.jsonl]" for c in ("distill", "instruct", "long")])
    assert tiny.teacher.source == "tiny"
    assert paper.student.sliding_window == 8192
    assert [paper.section(f"train.{s}").seq_len for s in ("stage1a", "stage1b", "stage2", "stage3")] == [8192, 8192, 8192, 32768]
    assert paper.run.stages == list(STAGE_ORDER)


def test_overrides_keep_their_yaml_types():
    cfg = load_config(TINY, ["train.stage1a.steps=5", "train.stage1a.lr=2e-4", "eval.benchmarks=[a, b]",
                             "run.root=s3://bucket/runs/x"])
    assert cfg.train.stage1a.steps == 5 and cfg.train.stage1a.lr == 2e-4
    assert cfg.eval.benchmarks == ["a", "b"] and cfg.run.root == "s3://bucket/runs/x"


@pytest.mark.parametrize("override, field", [
    ("train.stage1a.steps=-5", "train.stage1a.steps"),
    ("train.stage1a.stepz=5", "train.stage1a.stepz"),
    ("train.stage3.lora.r=many", "train.stage3.lora.r"),
    ("run.stages=[teacher, nonsense]", "run.stages"),
    ("run.stages=[data, teacher]", "run.stages"),
    ("eval.target=eval", "eval.target"),
    ("train.stage2.trainable=[model.language_model]", "train.stage2.trainable"),
    ("student.layer_types=[linear_attention, full_attention]", "student.layer_types"),
])
def test_bad_override_names_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert field in str(e.value)


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(TINY, ["train.stage1a.steps"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(TINY, ["run.name.first=x"])
    with pytest.raises(ConfigError, match="config not found"):
        load_config("configs/nope.yaml")


def test_every_stage_is_one_recipe_declaring_its_contract():
    """The registry is the recipe modules, in pipeline order, each declaring what the plan reads of it."""
    assert tuple(RECIPES) == STAGE_ORDER
    cfg = load_config(TINY)
    for name, recipe in RECIPES.items():
        assert recipe.NAME == name and isinstance(recipe.VERSION, int) and recipe.VERSION >= 1
        for section in recipe.SECTIONS:
            cfg.section(section)  # every declared section exists in the run config
        for need in recipe.inputs(cfg):
            assert STAGE_ORDER.index(need) < STAGE_ORDER.index(name)
        for step in ("run", "outputs", "check"):
            assert callable(getattr(recipe, step)), (name, step)
    assert check_plan(cfg) == cfg.run.stages


def test_plan_refuses_a_stage_whose_input_is_not_committed(tmp_path):
    cfg = load_config(TINY, [f"run.root={tmp_path}"])
    with pytest.raises(PlanError) as e:
        check_plan(cfg, only=["stage1b"])
    # every missing input is named, one line each
    lines = str(e.value).splitlines()
    assert [line.split(",")[0] for line in lines] == [f"stage stage1b needs {n}" for n in
                                                     ("teacher", "data", "stage1a", "teacher-logits")]
    assert all("which is missing" in line and "add" in line for line in lines)
    with pytest.raises(PlanError, match="unknown stage 'nonsense'"):
        check_plan(cfg, force=["nonsense"])


def test_student_layer_types_reach_the_student_config_and_a_wrong_length_is_refused():
    """Every layer linear (the sliding share 0 of the ablation) is a layer_types list; a list that does not
    match the teacher's depth fails in the model config, before any step, naming the field."""
    from model.config import ConfigError as ModelConfigError
    from model.config import InfiniteVLTextConfig
    from pipeline.train.objectives import student_overrides

    cfg = load_config(TINY, ["student.layer_types=[linear_attention, linear_attention, linear_attention, linear_attention]"])
    fields = student_overrides(cfg.student, 4)
    assert fields["layer_types"] == ["linear_attention"] * 4
    assert "layer_types" not in student_overrides(load_config(TINY).student, 4)  # the teacher family's layout
    assert student_overrides(load_config(TINY, ["student.layer_period=2"]).student, 4)["layer_types"] == \
        ["sliding_attention", "linear_attention", "sliding_attention", "linear_attention"]
    common = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, vocab_size=64)
    assert InfiniteVLTextConfig(num_hidden_layers=4, **common, **fields).layer_types == ["linear_attention"] * 4
    with pytest.raises(ModelConfigError, match="layer_types has 4 entries but num_hidden_layers is 6"):
        InfiniteVLTextConfig(num_hidden_layers=6, **common, **fields)


def test_the_sample_corpora_are_refused_before_any_work_where_pyav_is_missing(monkeypatch):
    import importlib.util

    data = RECIPES["data"]
    cfg = load_config(TINY)
    assert data.check(cfg) == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    problems = data.check(cfg)
    samples = [f"data.{c}.sources[{i}]" for c in ("distill", "instruct", "long")
               for i, s in enumerate(getattr(cfg.data, c).sources) if s == "sample"]
    assert samples and [p.split(":")[0] for p in problems] == samples
    assert all("need PyAV" in p and "pip install av" in p for p in problems)

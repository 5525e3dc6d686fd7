"""compare: config errors before training, a tiny comparison's table and report, metric helpers."""

import json
import re

import pytest
import yaml

from routelab.compare import compare, load_compare_config
from routelab.config import ConfigError
from routelab.report.summary import expert_load, seconds_at, steps_to_target

RUN = {
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32},
    "data": {"source": "SOURCE", "seq_len": 32, "val_fraction": 0.2},
    "train": {"batch_size": 4, "warmup_steps": 1, "eval_every": 2, "eval_batches": 2, "log_every": 1, "progress": False},
}


@pytest.fixture
def base_yaml(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("for i in range(10):\n    print(i * i)\n" * 80)
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(RUN).replace("SOURCE", str(corpus)))))
    return path


def write_compare(tmp_path, **fields):
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


def test_tiny_comparison_table_matches_run_summaries(base_yaml, tmp_path, capsys):
    cmp = write_compare(
        tmp_path,
        base="base.yaml",
        budget={"steps": 4},
        variants=[{"name": "dense"}, {"name": "swiglu", "set": ["model.ffn.activation=swiglu"]}],
    )
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    results = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in results] == ["dense", "swiglu"]
    for r in results:
        summary = json.loads((out / r["variant"] / "summary.json").read_text())
        assert r["val_loss"] == summary["val_loss"] and r["steps"] == summary["steps"] == 4
        assert r["tokens_per_s"] == summary["tokens_per_s"]
    assert results[0]["steps_to_target"] == 4  # the reference reaches its own final loss at its end
    captured = capsys.readouterr()
    printed = captured.out
    assert re.search(r"^dense\s", printed, re.M) and re.search(r"^swiglu\s", printed, re.M)
    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert progress[0] == f"[1/2] dense -> {out / 'dense'} (fresh)"
    assert re.fullmatch(r"\[1/2\] dense done in \d+s; about \d+s left", progress[1])
    assert progress[2] == f"[2/2] swiglu -> {out / 'swiglu'} (fresh)"
    assert re.fullmatch(r"\[2/2\] swiglu done in \d+s", progress[3]) and len(progress) == 4
    # every file the HTML references exists and is a non-empty PNG
    page = (out / "report.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) >= 3
    for src in srcs:
        data = (out / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # a finished variant is not rerun
    before = (out / "dense" / "summary.json").stat().st_mtime_ns
    compare(cmp, out=out, isolate=False)
    assert (out / "dense" / "summary.json").stat().st_mtime_ns == before
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")] == [
        f"[1/2] dense -> {out / 'dense'} (done)", f"[2/2] swiglu -> {out / 'swiglu'} (done)"]


def test_progress_estimates_the_time_left_from_the_variants_trained(monkeypatch, capsys):
    from routelab import compare as compare_module
    from routelab.compare import CompareProgress
    from routelab.train.metrics import format_duration

    clock = iter([0.0, 92.0, 92.0, 100.0, 200.0, 200.0, 310.0, 310.0, 410.0])  # start and end of each
    monkeypatch.setattr(compare_module.time, "perf_counter", lambda: next(clock))
    progress = CompareProgress({"dense": "fresh", "old": "done", "hash": "resume", "top2": "fresh", "last": "fresh"})
    for name, ok in [("dense", True), ("old", True), ("hash", False), ("top2", True), ("last", True)]:
        progress.start(name, compare_module.Path("runs") / name)
        progress.finish(name, ok)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "[1/5] dense -> runs/dense (fresh)",
        "[1/5] dense done in 1m32s; about 4m36s left",  # 92 s x the 3 still to train ('old' is done)
        "[2/5] old -> runs/old (done)",
        "[3/5] hash -> runs/hash (resume)",
        "[3/5] hash failed after 1m40s; about 3m04s left",  # a failure does not count towards the mean
        "[4/5] top2 -> runs/top2 (fresh)",
        "[4/5] top2 done in 1m50s; about 1m41s left",  # mean of 92 and 110 s, one variant left
        "[5/5] last -> runs/last (fresh)",
        "[5/5] last done in 1m40s",
    ]
    assert [format_duration(s) for s in (0.4, 59.6, 3599, 3720)] == ["0s", "1m00s", "59m59s", "1h02m"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"base": "base.yaml", "budget": {"steps": 2}, "variants": []}, "compare.variants"),
        ({"base": "base.yaml", "budget": {}, "variants": [{"name": "a"}]}, "exactly one of steps, tokens, seconds"),
        ({"base": "base.yaml", "budget": {"steps": 2}, "variants": [{"name": "a", "sett": []}]}, "did you mean 'set'"),
        ({"base": "base.yaml", "budget": {"steps": 2}, "variants": [{"name": "a", "set": ["model.d_modle=3"]}]}, "variant 'a'.*d_modle"),
        ({"base": "base.yaml", "budget": {"steps": 2}, "variants": [{"name": "a"}, {"name": "a"}]}, "unique variant names"),
        ({"base": "nope.yaml", "budget": {"steps": 2}, "variants": [{"name": "a"}]}, "neither a file nor a preset"),
    ],
)
def test_bad_comparison_configs_fail_before_training(base_yaml, tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        load_compare_config(write_compare(tmp_path, **fields))
    assert not (tmp_path / "a").exists()


def test_token_budget_becomes_steps(base_yaml, tmp_path):
    _, cfgs = load_compare_config(write_compare(tmp_path, base="base.yaml", budget={"tokens": 1280}, variants=[{"name": "a"}]))
    assert cfgs["a"].train.steps == 1280 // (4 * 32)


def test_steps_and_seconds_to_target_on_synthetic_curves():
    steps, losses = [10, 20, 30, 40], [3.0, 2.5, 2.1, 1.9]
    assert steps_to_target(steps, losses, 2.1) == 30
    assert steps_to_target(steps, losses, 2.0) == 40
    assert steps_to_target(steps, losses, 1.0) is None
    assert seconds_at(30, [10, 20, 40], [1.0, 2.0, 6.0]) == pytest.approx(4.0)
    assert seconds_at(5, [10], [2.0]) == pytest.approx(1.0)


def test_router_curves_normalise_entropy_by_ln_e_and_divide_the_gradient_norms():
    import math

    from routelab.report.summary import router_curves

    records = [
        {"step": 10, "router_grad_norm": 0.2, "expert_grad_norm": 0.8,
         "routing/layers.0.ffn/router_entropy": math.log(4), "routing/layers.0.ffn/tokens_per_expert": [1, 1, 1, 1],
         "routing/layers.1.ffn/router_entropy": 0.5 * math.log(8), "routing/layers.1.ffn/tokens_per_expert": [1] * 8},
        {"step": 10, "split": "val", "loss": 1.0},
        {"step": 20, "loss": 1.0},  # a dense model's line: no router
        {"step": 30, "router_grad_norm": 0.3, "expert_grad_norm": 0.1,
         "routing/layers.0.ffn/router_entropy": 0.0, "routing/layers.0.ffn/tokens_per_expert": [4, 0, 0, 0]},
    ]
    steps, entropy, ratio = router_curves(records)
    assert steps == [10, 30]
    assert entropy == pytest.approx([0.75, 0.0])  # mean of 1 (uniform over 4) and 0.5
    assert ratio == pytest.approx([0.25, 3.0])
    assert router_curves([{"step": 1, "loss": 2.0}]) == ([], [], [])


def test_expert_load_cv_and_dead_experts():
    key = "routing/layers.0.ffn/tokens_per_expert"
    records = [{"step": 1, key: [4, 4, 0, 0]}, {"step": 2, key: [2, 6, 0, 0]}, {"step": 2, "split": "val", "loss": 1}]
    cv, dead = expert_load(records)
    total = [6, 10, 0, 0]
    mean = sum(total) / 4
    std = (sum((t - mean) ** 2 for t in total) / 4) ** 0.5
    assert cv == pytest.approx(std / mean) and dead == 2
    assert expert_load([{"step": 1, "loss": 1.0}]) == (None, None)


def test_report_explains_its_columns(base_yaml, tmp_path):
    cmp = write_compare(
        tmp_path,
        base="base.yaml",
        budget={"steps": 2},
        variants=[{"name": "dense"}, {"name": "moe", "set": ["model.ffn.kind=moe", "model.ffn.num_experts=2"]}],
    )
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for header in ("active", "attn density", "expert CV", "dead experts", "steps to ref"):
        assert f"- **{header}**:" in md and f"<li><b>{header}</b>:" in page


def test_model_level_errors_fail_before_any_variant_trains(base_yaml, tmp_path):
    """Expert choice ranks the whole batch, so a causal LM refuses it when the model is built: the
    comparison must say so before the first variant trains, not after it."""
    bad = ["model.ffn.kind=moe", "model.ffn.router=expert_choice", "model.ffn.num_experts=2"]
    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 2}, variants=[{"name": "dense"}, {"name": "ec", "set": bad}])
    with pytest.raises(ConfigError, match="variant 'ec'.*expert_choice.*causal"):
        compare(cmp, out=tmp_path / "out", isolate=False)
    assert not (tmp_path / "out" / "dense").exists()


def test_budget_is_set_by_the_command_line_not_by_set(base_yaml, tmp_path):
    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 2}, variants=[{"name": "a"}])
    with pytest.raises(ConfigError, match=r"--set sets 'train.steps'.*--steps"):
        load_compare_config(cmp, ["train.steps=9"])
    _, cfgs = load_compare_config(cmp, budget={"steps": 9})
    assert cfgs["a"].train.steps == 9
    _, cfgs = load_compare_config(cmp, budget={"seconds": 5})
    assert cfgs["a"].train.max_seconds == 5 and cfgs["a"].train.steps == 1000  # the base's steps cap a time budget
    bad = write_compare(tmp_path, base="base.yaml", budget={"steps": 2}, variants=[{"name": "a", "set": ["train.max_seconds=3"]}])
    with pytest.raises(ConfigError, match="variant 'a' sets 'train.max_seconds'"):
        load_compare_config(bad)


def test_a_variant_trained_with_another_config_is_refused_or_rerun_with_force(base_yaml, tmp_path):
    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 2}, variants=[{"name": "dense"}])
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    old_model = (out / "dense" / "model" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"variant 'dense'.*another config \(train.steps \(2 -> 3\)\).*--force"):
        compare(cmp, out=out, isolate=False, budget={"steps": 3})
    assert (out / "dense" / "model" / "model.safetensors").read_bytes() == old_model  # untouched
    compare(cmp, out=out, isolate=False, budget={"steps": 3}, force=True)
    assert json.loads((out / "dense" / "summary.json").read_text())["steps"] == 3
    assert json.loads((out / "results.json").read_text())[0]["steps"] == 3
    assert not (out / ".dense.rerun").exists()  # the staged rerun was swapped in


def test_an_unfinished_resume_is_not_taken_for_a_finished_variant(base_yaml, tmp_path):
    """A run resumed to more steps and killed keeps its older summary.json: compare must resume it."""
    from routelab.train import train

    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 4}, variants=[{"name": "dense"}])
    _, cfgs = load_compare_config(cmp)
    short = load_compare_config(cmp, budget={"steps": 2})[1]["dense"]
    train(short, tmp_path / "out" / "dense")
    cfg = cfgs["dense"]
    import dataclasses

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=1))
    train(cfg, tmp_path / "out" / "dense", resume=True, stop_after=3)  # killed at step 3 of 4
    compare(cmp, out=tmp_path / "out", isolate=False)
    assert json.loads((tmp_path / "out" / "dense" / "summary.json").read_text())["steps"] == 4


def test_one_failing_variant_still_gets_a_report_and_one_error_line(base_yaml, tmp_path, capsys):
    """Each variant in its own process (as the CLI runs them); the failing one's error comes back."""
    from routelab.cli import main

    cmp = write_compare(
        tmp_path, base="base.yaml", budget={"steps": 2},
        variants=[{"name": "dense"}, {"name": "blowup", "set": ["model.init_std=1e30"]}],
    )
    assert main(["compare", str(cmp), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("routelab: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert re.search(r"1 of 2 variants failed: 'blowup' \(the training loss is .* at step 1", errors[0])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| dense |" in md and "`blowup` failed" in md


def test_a_comparison_of_expert_parallel_variants_reports_their_communication(base_yaml, tmp_path):
    """nproc: 2 trains each variant in two processes (routelab train --nproc 2); the table gains the
    communication columns from their summaries, and device-limited routing shows in them."""
    moe = "model.ffn={kind: moe, router: {kind: topk, top_k: 2}, num_experts: 4, hidden: 16}"
    cmp = write_compare(
        tmp_path,
        base="base.yaml",
        budget={"steps": 3},
        nproc=2,
        set=[moe, "train.expert_parallel=2", "train.threads=1"],
        variants=[{"name": "ep"}, {"name": "limited", "set": ["model.ffn.max_ranks_per_token=1"]}],
    )
    out = compare(cmp, out=tmp_path / "out")
    results = {r["variant"]: r for r in json.loads((out / "results.json").read_text())}
    for name, r in results.items():
        comm = json.loads((out / name / "summary.json").read_text())["communication"]
        assert r["a2a_mb_per_step"] == comm["a2a_sent_bytes_per_step"] / 1e6 > 0
        assert r["ranks_per_token"] == comm["ranks_per_token"]
    assert results["limited"]["ranks_per_token"] == 1.0 < results["ep"]["ranks_per_token"]
    report = (out / "report.md").read_text()
    assert "a2a MB/step" in report and "ranks/token" in report and "processes a token's chosen experts sat on" in report


def test_nproc_needs_variants_in_their_own_processes(base_yaml, tmp_path):
    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 1}, nproc=2, variants=[{"name": "dense"}])
    with pytest.raises(ConfigError, match="compare.nproc=2 needs each variant in its own processes"):
        compare(cmp, out=tmp_path / "out", isolate=False)
    assert not (tmp_path / "out").exists()
    plain = write_compare(tmp_path, base="base.yaml", budget={"steps": 1}, variants=[{"name": "dense"}])
    with pytest.raises(ConfigError, match="compare.nproc=3 needs each variant"):  # --nproc replaces the config's
        compare(plain, out=tmp_path / "out", isolate=False, nproc=3)


def test_prepared_runs_have_their_own_steps_and_at_names_resolve_to_their_folders(base_yaml, tmp_path):
    cmp = write_compare(
        tmp_path, base="base.yaml", budget={"steps": 3},
        prepare=[{"name": "first", "steps": 7, "set": ["model.d_model=16"]},
                 {"name": "second", "steps": 5, "set": ["model.embeddings_path=@first"]}],
        variants=[{"name": "a", "set": ["model.embeddings_path=@second"]}, {"name": "b"}],
    )
    _, cfgs = load_compare_config(cmp, out=tmp_path / "out")
    assert list(cfgs) == ["prepare/first", "prepare/second", "a", "b"]
    assert cfgs["prepare/first"].train.steps == 7 and cfgs["prepare/first"].model.d_model == 16
    assert cfgs["prepare/second"].model.embeddings_path == str(tmp_path / "out" / "prepare" / "first")
    assert cfgs["a"].model.embeddings_path == str(tmp_path / "out" / "prepare" / "second")
    assert cfgs["a"].train.steps == cfgs["b"].train.steps == 3 and cfgs["a"].model.d_model == 32


@pytest.mark.parametrize(
    "prepare, variant_set, message",
    [
        ([], ["model.embeddings_path=@teacher"], r"variant 'a'.*'model.embeddings_path=@teacher' refers to no prepared run; allowed: none"),
        ([{"name": "t"}], ["model.embeddings_path=@teacher"], r"refers to no prepared run; allowed: @t$"),
        ([{"name": "t", "set": ["model.embeddings_path=@u"]}, {"name": "u"}], [], r"prepared run 't'.*refers to no prepared run"),
        ([{"name": "t"}, {"name": "t"}], [], r"compare.prepare.*unique names"),
        ([{"name": "t", "set": ["train.steps=4"]}], [], r"prepared run 't' sets 'train.steps', but a prepared run.s budget is its steps: field"),
    ],
)
def test_bad_prepared_runs_and_references_fail_before_training(base_yaml, tmp_path, prepare, variant_set, message):
    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 2}, prepare=prepare, variants=[{"name": "a", "set": variant_set}])
    with pytest.raises(ConfigError, match=message):
        load_compare_config(cmp, out=tmp_path / "out")


def test_a_comparison_continues_a_prepared_run_and_upcycles_it(base_yaml, tmp_path):
    """``prepare:`` trains first; ``train.init_from=@base`` starts both variants from it (the MoE one
    upcycled: top-1 of copies with renormalised gates, so it starts as the dense model)."""
    cmp = write_compare(
        tmp_path, base="base.yaml", budget={"steps": 2},
        prepare=[{"name": "base", "steps": 3}],
        set=["train.init_from=@base"],
        variants=[{"name": "dense"},
                  {"name": "moe", "set": ["model.ffn.kind=moe", "model.ffn.router=topk", "model.ffn.router.top_k=1",
                                          "model.ffn.num_experts=2", "model.ffn.balance_loss_weight=0", "model.ffn.z_loss_weight=0"]}],
    )
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    base = json.loads((out / "prepare" / "base" / "summary.json").read_text())
    assert base["steps"] == 3
    first = {}
    for name in ("dense", "moe"):
        lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        first[name] = next(x["loss"] for x in lines if "loss" in x)
    assert first["moe"] == pytest.approx(first["dense"], abs=1e-5)  # both start from the prepared run's function
    report = (out / "report.md").read_text()
    assert "Prepared run `base` (`base.yaml`, 3 steps): val_loss" in report
    assert [r["variant"] for r in json.loads((out / "results.json").read_text())] == ["dense", "moe"]


def test_a_distillation_comparison_reports_the_teacher_and_the_gain_kept(base_yaml, tmp_path):
    cmp = write_compare(
        tmp_path, base="base.yaml", budget={"steps": 2},
        prepare=[{"name": "teacher", "steps": 6, "set": ["train.lr=3e-3"]}],
        variants=[{"name": "plain"},
                  {"name": "taught", "set": ["train.distill.teacher=@teacher", "train.distill.alpha=0.7"]},
                  {"name": "other", "set": ["model.ffn.activation=relu"]}],
    )
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())}
    teacher = json.loads((out / "prepare" / "teacher" / "summary.json").read_text())["val_loss"]
    assert rows["taught"]["teacher_val_loss"] == teacher and 0 < rows["taught"]["teacher_share"] < 1
    plain, taught = rows["plain"]["val_loss"], rows["taught"]["val_loss"]
    assert teacher < plain  # 6 steps beat 2
    assert rows["taught"]["gain_kept"] == pytest.approx((plain - taught) / (plain - teacher))
    assert rows["plain"]["gain_kept"] is None and rows["other"]["gain_kept"] is None
    assert "gain kept" in (out / "report.md").read_text()


def test_over_seeds_the_gain_kept_is_the_mean_of_each_seeds_share(base_yaml, tmp_path):
    cmp = write_compare(
        tmp_path, base="base.yaml", budget={"steps": 2}, seeds=2,
        prepare=[{"name": "teacher", "steps": 6, "set": ["train.lr=3e-3"]}],
        variants=[{"name": "plain"}, {"name": "taught", "set": ["train.distill.teacher=@teacher", "train.distill.alpha=0.7"]}],
    )
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())}
    teacher = json.loads((out / "prepare" / "teacher" / "summary.json").read_text())["val_loss"]
    loss = {(v, s): json.loads((out / v / f"seed-{s}" / "summary.json").read_text())["val_loss"] for v in ("plain", "taught") for s in (0, 1)}
    shares = [(loss["plain", s] - loss["taught", s]) / (loss["plain", s] - teacher) for s in (0, 1)]
    assert loss["taught", 0] != loss["taught", 1]  # the seeds differ, so a mean of one seed's share would be caught
    assert rows["taught"]["gain_kept"] == pytest.approx(sum(shares) / 2)
    assert rows["plain"]["gain_kept"] is None


def test_gain_kept_is_the_share_of_the_teachers_gain():
    from routelab.report.summary import gain_kept

    assert gain_kept(student=2.7, twin=3.0, teacher=2.0) == pytest.approx(0.3)
    assert gain_kept(student=3.1, twin=3.0, teacher=2.0) == pytest.approx(-0.1)  # distillation hurt
    assert gain_kept(student=2.0, twin=2.0, teacher=2.5) is None  # no gain to keep


def test_multitask_rows_get_a_column_group_per_task():
    from routelab.report.compare_report import legend, markdown_table, table
    from routelab.report.summary import Row

    base = dict(total_params=1, active_params=1, attention_flops=0.0, ffn_flops=0.0, flops_per_token=0.0,
                attention_density=1.0, tokens_per_s=None, peak_rss_mb=None, steps=1, seconds=None, val_loss=1.0,
                val_bpb=None, val_accuracy=None, steps_to_target=None, seconds_to_target=None, expert_load_cv=None,
                dead_experts=None)
    rows = [
        Row(variant="a", **base, tasks={"text": {"val_loss": 1.25, "val_bpb": 1.5}, "pkg": {"val_loss": 2.0, "val_accuracy": 0.5}}),
        Row(variant="b", **base, tasks={"text": {"val_loss": 1.0, "val_bpb": 1.25}}),
    ]
    headers, cells = table(rows)
    assert headers[-4:] == ["text loss", "text bpb", "pkg loss", "pkg acc"]  # empty columns (text acc, pkg bpb) left out
    assert cells[0][-4:] == ["1.2500", "1.5000", "2.0000", "0.500"] and cells[1][-2:] == ["-", "-"]
    assert "| text loss |" in markdown_table(rows)
    assert any("text loss" in h for h, _ in legend(rows))


def test_a_multi_task_comparison_maps_experts_per_task(tmp_path):
    """Task-level MoE (one expert per task): the report's tasks x experts map puts each task's
    validation tokens on its own expert only."""
    from routelab.report.compare_report import task_expert_maps

    for name, text in (("prose", "The cat sat on the mat. " * 80), ("code", "def add(a, b):\n    return a + b\n" * 60)):
        (tmp_path / f"{name}.txt").write_text(text)
    base = {
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32,
                  "ffn": {"kind": "moe", "num_experts": 2, "router": {"kind": "task", "top_k": 1}}},
        "data": {"seq_len": 32, "val_fraction": 0.2,
                 "tasks": [{"name": n, "source": str(tmp_path / f"{n}.txt"), "head": "lm"} for n in ("prose", "code")]},
        "train": {"batch_size": 4, "warmup_steps": 1, "eval_every": 2, "eval_batches": 2, "log_every": 1, "progress": False},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 2}, variants=[{"name": "task-level"}])
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    (loads, names), = task_expert_maps(["task-level"], {"task-level": out / "task-level"}).values()
    assert names == ["prose", "code"]
    load = loads["layers.0.ffn"]
    assert load[0, 0] > 0 and load[1, 1] > 0 and load[0, 1] == 0 and load[1, 0] == 0
    assert "Experts per task: task-level" in (out / "report.md").read_text()
    assert "prose loss" in (out / "report.md").read_text()  # a column group per task


def test_a_precision_comparison_shows_each_variants_precision(base_yaml, tmp_path, capsys):
    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 2},
                        variants=[{"name": "fp32"}, {"name": "bf16", "set": ["train.precision=bf16"]}])
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    results = json.loads((out / "results.json").read_text())
    assert [r["precision"] for r in results] == ["fp32", "bf16"]
    printed = capsys.readouterr().out
    assert re.search(r"^variant\s+precision\s", printed, re.M) and re.search(r"^bf16\s+bf16\s", printed, re.M)
    assert "train.precision: the forward pass's autocast dtype" in (out / "report.md").read_text()
    # all-fp32 comparisons keep the table they had: no precision column
    only = write_compare(tmp_path, base="base.yaml", budget={"steps": 2}, variants=[{"name": "fp32"}])
    out2 = compare(only, out=tmp_path / "out2", isolate=False)
    assert json.loads((out2 / "results.json").read_text())[0]["precision"] is None
    assert not re.search(r"^variant\s+precision\s", capsys.readouterr().out, re.M)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie nobody reaps counts as ended)."""
    from pathlib import Path

    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_killed_comparison_takes_its_training_process_with_it(base_yaml, tmp_path):
    """SIGKILL to ``routelab compare`` (nothing of it can clean up) ends the variant it was training."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 1000000}, variants=[{"name": "dense"}])
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "routelab", "compare", str(cmp), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=root)
    try:
        deadline = time.monotonic() + 120
        while not (out / "dense" / "metrics.jsonl").is_file():  # the variant trains (and holds its lock)
            assert proc.poll() is None and time.monotonic() < deadline, "the variant did not start"
            time.sleep(0.2)
        child = json.loads((out / "dense" / ".routelab.lock").read_text())["pid"]
        assert child != proc.pid and not _gone(child)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while not _gone(child):
            assert time.monotonic() < deadline, f"the variant's process {child} still trains after its comparison was killed"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_seeds_give_means_intervals_paired_differences_and_verdicts(base_yaml, tmp_path, capsys):
    import math

    from routelab.report.stats import paired_difference, t_quantile_975, verdict

    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 3}, seeds=2,
                        variants=[{"name": "dense"}, {"name": "wide", "set": ["model.ffn.hidden=96"]}])
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    summaries = {(v, s): json.loads((out / v / f"seed-{s}" / "summary.json").read_text()) for v in ("dense", "wide") for s in (0, 1)}
    for v in ("dense", "wide"):
        for s in (0, 1):
            assert yaml.safe_load((out / v / f"seed-{s}" / "config.yaml").read_text())["train"]["seed"] == s
        assert summaries[(v, 0)]["val_loss"] != summaries[(v, 1)]["val_loss"]  # other seeds, other runs
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())}
    for v in ("dense", "wide"):
        a, b = summaries[(v, 0)]["val_loss"], summaries[(v, 1)]["val_loss"]
        assert rows[v]["seeds"] == 2 and rows[v]["val_loss"] == pytest.approx((a + b) / 2)
        assert rows[v]["val_loss_ci"] == pytest.approx(t_quantile_975(1) * abs(a - b) / math.sqrt(2) / math.sqrt(2))
    bpb = {v: {s: summaries[(v, s)]["val_bpb"] for s in (0, 1)} for v in ("dense", "wide")}
    diff = paired_difference(bpb["wide"], bpb["dense"])
    assert rows["wide"]["metric"] == "val_bpb" and rows["wide"]["vs_ref"] == pytest.approx(diff.mean)
    assert rows["wide"]["verdict"] == verdict(diff) and rows["dense"]["verdict"] == "reference"
    printed = capsys.readouterr().out
    assert " ± " in printed and "verdict" in printed and "One seed per variant" not in printed
    from routelab.report.compare_report import seed_bands

    steps, mean, low, high = seed_bands(["wide"], out, 2)["wide"]
    finals = [json.loads((out / "wide" / f"seed-{s}" / "summary.json").read_text())["val_loss"] for s in (0, 1)]
    assert steps[-1] == 3 and (low[-1], high[-1]) == pytest.approx((min(finals), max(finals)))
    assert mean[-1] == pytest.approx(sum(finals) / 2)
    assert "Validation loss by step (mean over 2 seeds; band: min to max)" in (out / "report.md").read_text()


def test_one_seed_says_differences_cannot_be_judged(base_yaml, tmp_path, capsys):
    from routelab.report.compare_report import ONE_SEED_NOTE

    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 2}, variants=[{"name": "dense"}])
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    assert ONE_SEED_NOTE in capsys.readouterr().out and ONE_SEED_NOTE in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())[0]["verdict"] is None  # no verdict column at all


def test_more_seeds_keep_the_one_seed_run_and_resume_an_interrupted_seed(base_yaml, tmp_path, capsys):
    """A one-seed comparison's run becomes seed 0 (not retrained); a seed killed mid-run resumes."""
    from routelab.compare import adopt_as_seed_zero
    from routelab.train import train

    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 4}, variants=[{"name": "dense"}])
    out = tmp_path / "out"
    compare(cmp, out=out, isolate=False)
    first = (out / "dense" / "summary.json").read_bytes()
    _, configs = load_compare_config(cmp, out=out, seeds=2)
    assert sorted(configs) == ["dense/seed-0", "dense/seed-1"]
    adopt_as_seed_zero(out / "dense")  # what a comparison over 2 seeds does first, then it was killed...
    train(configs["dense/seed-1"], out / "dense" / "seed-1", stop_after=2)  # ...after step 2 of seed 1
    capsys.readouterr()
    compare(cmp, out=out, isolate=False, seeds=2)
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert progress[0].endswith("(done)") and "seed-0" in progress[0]
    assert any(line.endswith("(resume)") and "seed-1" in line for line in progress)
    assert (out / "dense" / "seed-0" / "summary.json").read_bytes() == first
    assert json.loads((out / "dense" / "seed-1" / "summary.json").read_text())["steps"] == 4
    assert not (out / "dense" / "config.yaml").exists()


def test_a_flops_budget_gives_equal_compute(base_yaml, tmp_path):
    """budget: {flops: X}: steps = X / (3 x forward FLOPs per token x tokens per step), so a variant
    with about twice the FLOPs per token trains about half the tokens."""
    from routelab.compare import forward_flops_per_token

    cmp = write_compare(tmp_path, base="base.yaml", budget={"flops": 6e10},
                        variants=[{"name": "dense"}, {"name": "wide", "set": ["model.ffn.hidden=448"]}])
    _, configs = load_compare_config(cmp, out=tmp_path / "out")
    per_step = 4 * 1 * 32  # batch_size x grad_accum x seq_len of RUN
    flops = {n: forward_flops_per_token(c) for n, c in configs.items()}
    assert 1.9 < flops["wide"] / flops["dense"] < 2.1
    for name, cfg in configs.items():
        assert cfg.train.steps == round(6e10 / (3 * flops[name] * per_step))
        assert abs(cfg.train.steps * per_step * 3 * flops[name] - 6e10) <= 3 * flops[name] * per_step  # within a step
    tokens = {n: c.train.steps * per_step for n, c in configs.items()}
    assert tokens["dense"] / tokens["wide"] == pytest.approx(flops["wide"] / flops["dense"], rel=0.01)
    with pytest.raises(ConfigError, match="exactly one of steps, tokens, seconds, flops"):
        load_compare_config(write_compare(tmp_path, base="base.yaml", budget={"flops": 1e9, "steps": 3},
                                          variants=[{"name": "dense"}]))


def test_a_moe_comparison_reports_router_entropy_and_gradient_share(base_yaml, tmp_path):
    import numpy as np

    from routelab.report.summary import router_curves
    from routelab.train.metrics import read_metrics

    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 4}, seeds=2,
                        variants=[{"name": "dense"}, {"name": "switch", "set": ["model.ffn.kind=moe", "model.ffn.num_experts=4"]}])
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())}
    assert rows["dense"]["router_entropy"] is None and rows["dense"]["router_grad_ratio"] is None
    curves = [router_curves(read_metrics(out / "switch" / f"seed-{s}")) for s in (0, 1)]
    assert all(c[0] == [1, 2, 3, 4] for c in curves)  # log_every=1
    assert rows["switch"]["router_entropy"] == pytest.approx(np.mean([np.mean(c[1][-5:]) for c in curves]))
    assert rows["switch"]["router_grad_ratio"] == pytest.approx(np.mean([np.mean(c[2]) for c in curves]))
    assert 0.5 < rows["switch"]["router_entropy"] <= 1.0  # 4 steps from a near-uniform start
    from routelab.report.summary import expert_load

    loads = [expert_load(read_metrics(out / "switch" / f"seed-{s}")) for s in (0, 1)]
    assert rows["switch"]["expert_load_cv"] == pytest.approx(np.mean([cv for cv, _ in loads]))  # every seed's, not seed 0's
    assert rows["switch"]["dead_experts"] == pytest.approx(np.mean([dead for _, dead in loads]))
    report = (out / "report.md").read_text()
    assert "router H" in report and (out / "plots" / "routers.png").is_file()


def test_another_reference_rewrites_the_report_without_retraining(base_yaml, tmp_path):
    from routelab.report.stats import paired_difference

    cmp = write_compare(tmp_path, base="base.yaml", budget={"steps": 2}, seeds=2,
                        variants=[{"name": "dense"}, {"name": "wide", "set": ["model.ffn.hidden=96"]}])
    out = compare(cmp, out=tmp_path / "out", isolate=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/summary.json")}
    compare(cmp, out=out, isolate=False, reference="wide")
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/summary.json")} == stamps  # nothing retrained
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())}
    assert rows["wide"]["verdict"] == "reference" and rows["wide"]["steps_to_target"] == 2
    diff = paired_difference(rows["dense"]["per_seed"], rows["wide"]["per_seed"])
    assert rows["dense"]["vs_ref"] == pytest.approx(diff.mean)
    assert "reference `wide`" in (out / "report.md").read_text()
    with pytest.raises(ConfigError, match=r"compare.reference.*one of the variant names"):
        compare(cmp, out=out, isolate=False, reference="nope")


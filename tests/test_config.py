"""Config: defaults, YAML < overrides, typed parsing with clear errors, save/load round trip."""

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml

from ril_fast.config import Config, ConfigError, JudgeKind, help_text, load_config, valid_keys
from ril_fast.kernels.disc_head import Pool


def test_defaults_are_valid_and_every_field_has_help():
    config = Config()
    assert config == load_config([])

    def check(obj, prefix):
        for f in fields(obj):
            assert f.metadata.get("help", "").strip(), f"{prefix}{f.name} has no help"
            if is_dataclass(f.type) or is_dataclass(getattr(obj, f.name)):
                check(getattr(obj, f.name), f"{prefix}{f.name}.")

    check(config, "")
    # The demo defaults: no student, no data -> the demo's data and its two teachers (RIL).
    assert config.student == "" and config.train_data is None and config.teachers is None
    assert not config.rl_only


@pytest.mark.parametrize("arg, attr, expected", [
    ("student=/models/s", "student", "/models/s"),
    ("train_data=/d/train.jsonl", "train_data", "/d/train.jsonl"),
    ("teachers=a.jsonl,b.jsonl", "teachers", ["a.jsonl", "b.jsonl"]),
    ("teachers= a.jsonl , ", "teachers", ["a.jsonl"]),
    ("teachers=", "teachers", []),
    ("judge=rule", "judge", JudgeKind.RULE),
    ("judge=RULE", "judge", JudgeKind.RULE),
    ("steps=7", "steps", 7),
    ("group_size=3", "group_size", 3),
    ("mu=2", "mu", 2),
    ("beta=0.04", "beta", 0.04),
    ("beta=1e-3", "beta", 1e-3),
    ("beta=1", "beta", 1.0),
    ("max_new_tokens=32", "max_new_tokens", 32),
    ("seed=-3", "seed", -3),
    ("output_dir=/tmp/run", "output_dir", "/tmp/run"),
    ("eval_data=/d/test.jsonl", "eval_data", "/d/test.jsonl"),
    ("eval_data=", "eval_data", ""),
    ("eval_data=none", "eval_data", None),
    ("eval_every=3", "eval_every", 3),
    ("progress=false", "progress", False),
    ("progress=Yes", "progress", True),
    ("progress=0", "progress", False),
])
def test_every_top_level_name_is_settable(arg, attr, expected):
    config = load_config([arg])
    value = getattr(config, attr)
    assert value == expected and type(value) is type(expected), f"{arg} gave {value!r}"


def test_section_fields_and_http_judge():
    config = load_config(["rollout.temperature=0.7", "rollout.top_p=0.9", "optim.lr=3e-4", "disc.pool=mean",
                          "loss.eps_high=0.28", "batch.max_tokens=2048", "judge=http",
                          "judge_url=http://127.0.0.1:8000/v1", "judge_model=qwen"])
    assert (config.rollout.temperature, config.rollout.top_p, config.optim.lr) == (0.7, 0.9, 3e-4)
    assert config.disc.pool is Pool.MEAN and config.loss.eps_high == 0.28 and config.batch.max_tokens == 2048
    assert config.judge is JudgeKind.HTTP and config.judge_model == "qwen"
    assert config.optim.grad_clip == 0.02  # untouched fields keep their defaults


def test_yaml_then_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("steps: 5\noptim:\n  lr: 1e-2\n  warmup_steps: 2\nrollout:\n  temperature: 0.5\n"
                    "teachers: [a.jsonl, b.jsonl]\n")
    more = tmp_path / "more.yaml"
    more.write_text("optim:\n  warmup_steps: 3\n")
    # Overrides win over every file wherever they stand; later files win over earlier ones.
    config = load_config(["steps=9", "--config", str(base), f"--config={more}", "rollout.temperature=0.9"])
    assert config.steps == 9
    assert config.optim.lr == 1e-2  # YAML reads 1e-2 as a string: parsed by the field's type
    assert config.optim.warmup_steps == 3
    assert config.rollout.temperature == 0.9
    assert config.teachers == ["a.jsonl", "b.jsonl"]
    assert config.mu == Config().mu


@pytest.mark.parametrize("argv, fragments", [
    (["steps=abc"], ["steps", "'abc'", "expected int"]),
    (["steps=2.5"], ["steps", "expected int"]),
    (["beta=x"], ["beta", "expected float"]),
    (["progress=maybe"], ["progress", "true or false"]),
    (["judge=gpt"], ["judge", "rule", "hf", "http"]),
    (["disc.pool=max"], ["disc.pool", "last", "mean"]),
    (["stpes=3"], ["unknown config key 'stpes'", "valid keys", "steps", "optim.lr", "batch.max_tokens"]),
    (["optim.learning_rate=1"], ["unknown config key 'optim.learning_rate'", "optim.lr"]),
    (["steps.x=1"], ["unknown config key 'steps.x'"]),
    (["optim=3"], ["'optim' is a section", "optim.lr"]),
    (["steps"], ["cannot read argument 'steps'", "key=value"]),
    (["--config"], ["--config needs a YAML file"]),
    (["--config", "/nonexistent/x.yaml"], ["cannot read config file /nonexistent/x.yaml"]),
    (["mu=0"], ["mu (μ) must be >= 1"]),
    (["rollout.top_p=1.5"], ["rollout.top_p must be in (0, 1]"]),
    (["rollout.top_k=-1"], ["rollout.top_k must be >= 0 (0 = off)"]),
    (["rollout.temperature=nan"], ["rollout.temperature must be > 0"]),
    (["optim.lr=inf", "disc.lr=inf"], ["optim.lr must be > 0 and finite", "disc.lr must be > 0 and finite"]),
    (["disc.grad_clip=-1", "disc.weight_decay=-1"], ["disc.grad_clip must be >= 0", "disc.weight_decay must be >= 0"]),
    (["beta=-1", "steps=-1"], ["beta (β) must be >= 0", "steps must be >= 0"]),
    (["seed=5000000000"], ["seed must lie in (-2^31, 2^31)"]),
    (["judge=http"], ["judge=http needs judge_url and judge_model"]),
    (["teachers=", "group_size=1"], ["group_size (G) must be >= 2 in RL-only mode"]),
    (["max_new_tokens=64", "batch.max_tokens=64"], ["batch.max_tokens must exceed max_new_tokens"]),
    (["judge_timeout_s=inf"], ["judge_timeout_s must be > 0 and finite"]),  # a socket timeout overflows
    (["train_data="], ["train_data must not be empty"]),
    # a blank path would read as the current folder: "error: .:0: cannot read the file: Is a directory"
    (["train_data= "], ["train_data: ' ' is blank: give a path"]),
    (["eval_data=\t"], ["eval_data: '\\t' is blank: give a path (empty: no evaluation)"]),
])
def test_bad_arguments_give_clear_errors(argv, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in {str(e.value)!r}"


@pytest.mark.parametrize("text, fragments", [
    ("stepz: 3\n", ["unknown config key 'stepz'", "valid keys"]),
    ("optim:\n  lrr: 3\n", ["unknown config key 'optim.lrr'"]),
    ("optim: 3\n", ["'optim' is a section"]),
    ("steps: [1, 2]\n", ["steps", "expected int"]),
    ("steps: true\n", ["steps", "expected int"]),
    ("student: 12\n", ["student", "expected str"]),
    ("teachers: [a.jsonl, 3]\n", ["teachers", "list of strings"]),
    ("- 1\n- 2\n", ["must be a mapping"]),
    ("steps: [\n", ["not valid YAML"]),
    ("steps: 2\nrollout:\n\n  top_p: abc\n", [":4: rollout.top_p: cannot use 'abc'"]),  # the key's own line
    ("steps: 2\noptim.lrr: 3\n", [":2: unknown config key 'optim.lrr'"]),
    ("optim.lr: 0.5\noptim:\n  lr: 0.25\n", [":3: 'optim.lr' is given twice (dotted, and in its section)"]),
    ("steps.x: 3\n", [":1: unknown config key 'steps.x'"]),
    (b"# r\xe9glages (Latin-1)\nsteps: 3\n", ["not valid YAML", "position 3"]),
    # an empty or blank path would read as the current folder ("error: .:0: cannot read the file: Is a directory")
    ("steps: 2\nteachers:\n  - a.jsonl\n  - ''\n",
     [":2: teachers: entry 2 of ['a.jsonl', ''] is empty: give each teacher collection's path, or remove the entry"]),
    ("teachers: [a.jsonl, b.jsonl, ' ']\n", [":1: teachers: entry 3 of ['a.jsonl', 'b.jsonl', ' '] is blank"]),
    ("steps: 2\ntrain_data: ' '\n", [":2: train_data: ' ' is blank: give a path"]),
    ("eval_data: '  '\n", [":1: eval_data: '  ' is blank: give a path (empty: no evaluation)"]),
])
def test_bad_yaml_gives_clear_errors(tmp_path, text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(path)])
    assert str(e.value).startswith(str(path))
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in {str(e.value)!r}"


def test_yaml_takes_dotted_keys_utf16_and_says_where_a_bad_value_was_set(tmp_path):
    """A key dotted as on the command line is its section's field; a UTF-16 file (with its byte-order mark) is read;
    a value out of range is said with where it was set: the file's line, or the command line."""
    path = tmp_path / "run.yaml"
    path.write_text("steps: 4\noptim.lr: 1.0e-6\nrollout:\n  top_p: 0.5\n", encoding="utf-16")
    cfg = load_config(["--config", str(path)])
    assert (cfg.steps, cfg.optim.lr, cfg.rollout.top_p) == (4, 1e-6, 0.5)
    path.write_text("steps: 4\nmu: 0\nrollout:\n  top_p: 1.5\nmax_new_tokens: 5000\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(path), "beta=-1", "optim.beta1=0.9", "optim.beta2=1.5"])
    assert str(e.value) == (f"invalid config:\n  mu (μ) must be >= 1 (set at {path}:2)\n  beta (β) must be >= 0 "
                            f"(set on the command line)\n  rollout.top_p must be in (0, 1] (set at {path}:4)\n  "
                            f"optim.beta1 and optim.beta2 must be in [0, 1) (optim.beta1 set on the command line; "
                            f"optim.beta2 set on the command line)\n  batch.max_tokens must exceed max_new_tokens: a "
                            f"sample holds a prompt and a response (set at {path}:5)")


def test_where_a_value_was_set_names_only_the_keys_the_check_names(tmp_path):
    """A check's words that are keys only as a key (its message's "the student's" is not the setting student)."""
    path = tmp_path / "run.yaml"
    path.write_text("student: my_model\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(path), "max_image_pixels=-1"])
    assert str(e.value) == ("invalid config:\n  max_image_pixels must be >= 0 (0 = the student's image processor's "
                            "own) (set on the command line)")


def test_paths_starting_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch):
    """YAML keeps ``~`` as written (a shell expands it on the command line): a run would write into a folder
    called ``~`` under the current one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: ~/runs/a\nteachers: [~/t1.jsonl, t2.jsonl]\ntrain_data: ~/d.jsonl\n"
                    "student: ~/m\nresume: auto\n")
    cfg = load_config(["--config", str(path), "eval_data=~/e.jsonl"])
    assert (cfg.output_dir, cfg.teachers, cfg.train_data) == (f"{tmp_path}/runs/a", [f"{tmp_path}/t1.jsonl",
                                                                                     "t2.jsonl"], f"{tmp_path}/d.jsonl")
    assert (cfg.student, cfg.eval_data, cfg.resume) == (f"{tmp_path}/m", f"{tmp_path}/e.jsonl", "auto")


def test_judge_paths_starting_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch):
    """The hf judge's model folder and the judge's verdict cache, set in YAML with ``~``, are in the home folder too
    (the cache would otherwise be a new SQLite file under a folder called ``~``)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text("judge: hf\njudge_model: ~/judge\njudge_cache: ~/verdicts.sqlite\n")
    cfg = load_config(["--config", str(path)])
    assert (cfg.judge_model, cfg.judge_cache) == (f"{tmp_path}/judge", f"{tmp_path}/verdicts.sqlite")


def test_empty_list_entries_on_the_command_line_are_dropped():
    """``a,,b`` on the command line is ``a,b`` (a blank entry too); an empty value is the empty list (RL only). Set
    in code, a blank path is refused as it is from a file."""
    assert load_config(["teachers=a.jsonl,, ,b.jsonl"]).teachers == ["a.jsonl", "b.jsonl"]
    assert load_config(["teachers="]).teachers == []
    assert load_config(["eval_data="]).eval_data == ""  # empty: no evaluation
    with pytest.raises(ConfigError, match=r"teachers: entry 2 of \['a.jsonl', ''\] is empty"):
        Config(teachers=["a.jsonl", ""])
    with pytest.raises(ConfigError, match="train_data: ' ' is blank"):
        Config(train_data=" ")


def test_wrong_types_set_in_code_are_rejected():
    with pytest.raises(ConfigError, match="steps: cannot use '5'"):
        Config(steps="5")
    with pytest.raises(ConfigError, match="teachers"):
        Config(teachers="a.jsonl")
    assert Config(judge="rule").judge is JudgeKind.RULE  # enums may be given by value
    assert isinstance(Config(beta=1).beta, float)


def test_save_load_round_trip(tmp_path):
    config = load_config(["teachers=t1.jsonl,t2.jsonl", "train_data=train.jsonl", "eval_data=", "steps=3",
                          "beta=0.1", "disc.pool=mean", "judge=hf", "judge_model=/m/judge", "progress=off"])
    path = config.save(tmp_path / "run" / "config.yaml")
    saved = yaml.safe_load(path.read_text())
    assert saved["disc"]["pool"] == "mean" and saved["judge"] == "hf" and saved["eval_data"] == ""
    assert load_config(["--config", str(path)]) == config
    assert Config.from_dict(config.to_dict()) == config
    # A default config round-trips too (None values included).
    assert load_config(["--config", str(Config().save(tmp_path / "d.yaml"))]) == Config()


def test_a_saved_config_reads_as_written(tmp_path):
    """``save`` writes the keys in their declaration order (``--help``'s and ``describe``'s), sections nested, and
    non-ASCII text as it is, not escaped."""
    config = load_config(["student=/modèles/élève", "steps=3"])
    text = config.save(tmp_path / "config.yaml").read_text(encoding="utf-8")
    assert "student: /modèles/élève\n" in text
    keys, section = [], ""
    for line in text.splitlines():
        key = line.split(":")[0]
        if not line.startswith(" ") and line.endswith(":"):
            section = key + "."
            continue
        keys.append(section + key.strip() if line.startswith(" ") else key)
    assert keys == valid_keys()


def test_describe_lists_every_key_and_marks_changes():
    text = load_config(["steps=3", "optim.lr=0.5"]).describe()
    lines = {line.split("=")[0].strip(): line for line in text.splitlines()[1:]}
    assert list(lines) == valid_keys()
    assert lines["steps"].endswith("3 *") and lines["optim.lr"].endswith("0.5 *")
    assert not lines["mu"].endswith("*")


# Each range check at its edges (the module's and the help's words): the last value accepted, and the first refused
# with a message naming the setting. ("teachers=a.jsonl": RIL, where one output per group is allowed; the second
# value of a key repeated on the command line wins.)
_HTTP = ["judge=http", "judge_url=https://judge.example", "judge_model=m"]
_ACCEPTED = [["steps=0"], [f"seed={2**31 - 1}"], [f"seed={-2**31 + 1}"], ["group_size=1", "teachers=a.jsonl"],
             ["mu=1"], ["beta=0"], ["max_image_pixels=0"], ["eval_every=0"], ["eval_max_examples=0"], ["log_every=1"],
             ["checkpoint_every=0"], ["keep_checkpoints=0"], ["max_bad_steps=1"], ["rollout.top_p=1"],
             ["rollout.top_k=0"], ["rollout.batch_size=1"], ["optim.weight_decay=0"],
             ["optim.beta1=0", "optim.beta2=0"],
             ["optim.grad_clip=0"], ["optim.warmup_steps=0"], ["disc.weight_decay=0"], ["disc.grad_clip=0"],
             ["disc.pretrain_steps=0"], ["disc.threshold=0.999"], ["loss.eps_low=0"], ["loss.eps_high=0"],
             ["batch.questions_per_step=1"], ["batch.shard_ranks=0"], ["max_new_tokens=1", "batch.max_tokens=2"],
             ["judge_retries=0"], ["judge_timeout_s=999999999"], _HTTP, [*_HTTP, "judge_url=http://judge"],
             ["judge=hf", "judge_model=m"]]
_REFUSED = [
    (["steps=-1"], "steps"), ([f"seed={2**31}"], "seed"), ([f"seed={-2**31}"], "seed"),
    (["group_size=0"], "group_size"),
    (["group_size=1", "teachers="], "RL-only"), (["mu=0"], "mu"), (["beta=-0.001"], "beta"),
    (["max_image_pixels=-1"], "max_image_pixels"), (["eval_every=-1"], "eval_every"),
    (["eval_max_examples=-1"], "eval_max_examples"), (["log_every=0"], "log_every"),
    (["checkpoint_every=-1"], "checkpoint_every"), (["keep_checkpoints=-1"], "keep_checkpoints"),
    (["max_bad_steps=0"], "max_bad_steps"), (["rollout.temperature=0"], "rollout.temperature"),
    (["rollout.top_p=0"], "rollout.top_p"), (["rollout.top_p=1.001"], "rollout.top_p"),
    (["rollout.top_k=-1"], "rollout.top_k"), (["rollout.batch_size=0"], "rollout.batch_size"),
    (["optim.lr=0"], "optim.lr"), (["optim.lr=inf"], "optim.lr"), (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.beta1=1"], "optim.beta1"), (["optim.beta2=1"], "optim.beta2"), (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"), (["disc.lr=0"], "disc.lr"), (["disc.lr=inf"], "disc.lr"),
    (["disc.weight_decay=-0.1"], "disc.weight_decay"), (["disc.grad_clip=-1"], "disc.grad_clip"),
    (["disc.pretrain_steps=-1"], "disc.pretrain_steps"), (["disc.threshold=0"], "disc.threshold"),
    (["disc.threshold=1"], "disc.threshold"), (["loss.eps_low=1"], "loss.eps_low"),
    (["loss.eps_low=-0.1"], "loss.eps_low"),
    (["loss.eps_high=-0.1"], "loss.eps_high"), (["batch.questions_per_step=0"], "batch.questions_per_step"),
    (["batch.shard_ranks=-1"], "batch.shard_ranks"), (["max_new_tokens=0"], "max_new_tokens"),
    (["max_new_tokens=8", "batch.max_tokens=8"], "batch.max_tokens"), (["judge_batch_size=0"], "judge_batch_size"),
    (["judge_concurrency=0"], "judge_concurrency"), (["judge_timeout_s=0"], "judge_timeout_s"),
    (["judge_timeout_s=1e9"], "judge_timeout_s"), (["judge_retries=-1"], "judge_retries"),
    (["judge=http", "judge_url=https://judge.example"], "judge=http needs"), (["judge=http", "judge_model=m"],
                                                                            "judge=http needs"),
    ([*_HTTP, "judge_url=ftp://judge"], "judge_url must start"), (["judge=hf"], "judge=hf needs"),
    (["resume="], "resume"), (["output_dir="], "output_dir")]


@pytest.mark.parametrize("argv", _ACCEPTED, ids=" ".join)
def test_each_range_check_accepts_its_edge(argv):
    load_config(argv)


@pytest.mark.parametrize("argv, name", _REFUSED, ids=[" ".join(a) for a, _ in _REFUSED])
def test_each_range_check_refuses_just_past_its_edge(argv, name):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert any(name in problem for problem in e.value.problems), e.value.problems  # judge=http without a URL: 2


def test_mode_is_derived_from_teachers():
    assert load_config(["teachers="]).rl_only
    assert load_config(["train_data=own.jsonl"]).rl_only  # own data, no teachers named
    assert not load_config(["train_data=own.jsonl", "teachers=t.jsonl"]).rl_only
    assert not load_config([]).rl_only  # the demo: its two teachers


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == help_text().strip()
    for key in valid_keys():
        assert f"\n  {key} = " in out
    # Each default as printed, given back on the command line, is the default.
    shown = dict(line.strip().split("  [")[0].split(" = ", 1) for line in out.splitlines()
                 if line.startswith("  ") and not line.startswith("   ") and " = " in line)
    assert sorted(shown) == sorted(valid_keys())
    default = load_config([])
    for key, text in shown.items():
        given = load_config([f"{key}={'' if text == '(empty)' else text}"])
        assert _get(given, key) == _get(default, key), (key, text)


def _get(cfg, key: str):
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


@pytest.mark.parametrize("text, key, line, first", [
    ("steps: 2\nsteps: 3\n", "steps", 2, 1),
    ("optim:\n  lr: 1e-6\noptim:\n  grad_clip: 1.0\n", "optim", 3, 1),  # the second section would replace the first
    ("steps: 2\nrollout:\n  temperature: 0.5\n  top_p: 0.9\n  temperature: 0.7\n", "temperature", 5, 3),
], ids=["top_level", "section", "nested"])
def test_a_repeated_yaml_key_is_an_error(tmp_path, text, key, line, first):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(path)])
    assert str(e.value) == (f"{path}:{line}: key {key!r} is repeated (first on line {first}); "
                            f"YAML would keep only the last value")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("optim:\n  <<: {lr: 0.5, grad_clip: 2.0}\n  lr: 0.25\n")
    config = load_config(["--config", str(path)])
    assert (config.optim.lr, config.optim.grad_clip) == (0.25, 2.0)


def test_the_real_student_example_is_a_valid_config():
    """docs/real_student.yaml (the README's recipe) loads as it is: every key exists and every value parses."""
    config = load_config(["--config", str(Path(__file__).resolve().parents[1] / "docs" / "real_student.yaml")])
    assert not config.rl_only and len(config.teachers) == 2 and config.judge is JudgeKind.HTTP
    assert config.optim.lr == 1e-6 and config.batch.activation_checkpointing and config.group_size == 4


def test_python_m_ril_fast_config_prints_the_resolved_settings_or_one_error_line():
    """``python -m ril_fast.config [...]`` shows the settings a run would take (``*``: not the default); a bad key is
    one ``error:`` line, status 1, not a traceback."""
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "ril_fast.config", "steps=3"], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0 and any(line.split() == ["steps", "=", "3", "*"] for line in shown.stdout.splitlines())
    bad = subprocess.run([sys.executable, "-m", "ril_fast.config", "stepz=3"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown config key 'stepz'; valid keys: student,")
    assert len(bad.stderr.splitlines()) == 1, bad.stderr

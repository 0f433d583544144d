"""The CLI parser is transformers' HfArgumentParser over RunConfig; help comes from `flag` or attribute docstrings."""

from dataclasses import dataclass

import pytest
from transformers import HfArgumentParser

from ds_distill.config import RunConfig, build_parser, dataclass_parser, field_docs, flag, parse_args


@dataclass
class Documented:
    plain: int = 3
    """Documented by the string under it,
    over two lines."""
    helped: float = flag(0.5, "Documented by flag.")
    both: str = flag("x", "flag wins.")
    """Not shown."""
    names: list[str] = flag(list, "A repeatable list.", multi=True)


def test_help_comes_from_docstrings_and_flag():
    assert field_docs(Documented) == {
        "plain": "Documented by the string under it,\nover two lines.",
        "helped": "Documented by flag.",
        "both": "flag wins.",
        "names": "A repeatable list.",
    }
    parser = dataclass_parser(Documented)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["plain"].startswith("Documented by the string") and helps["both"] == "flag wins."
    (out,) = parser.parse_args_into_dataclasses(
        ["--plain", "4", "--names", "a", "--names", "b"], look_for_args_file=False
    )
    assert out == Documented(plain=4, names=["a", "b"])
    run_helps = {a.dest: a.help for a in build_parser()._actions}
    assert all(run_helps[f] for f in RunConfig.__dataclass_fields__), "every RunConfig field has help text"


def test_help_says_where_the_deepspeed_settings_go(capsys):
    """A newcomer's first question (learning rate, batch size) is answered in --help's description."""
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Learning rate, batch size" in out and "--deepspeed_config" in out and "ds_configs/" in out


def test_run_config_parser_is_hf_argument_parser():
    assert isinstance(build_parser(), HfArgumentParser)
    # HfArgumentParser's own forms come along: dashed aliases, --no_<flag> for True defaults, several values at once
    cfg = parse_args(["--teacher", "a", "b", "--teacher", "c", "--seq-len", "8", "--no_export"])
    assert cfg.teacher == ["a", "b", "c"] and cfg.seq_len == 8 and cfg.export is False
    assert parse_args(["--packing", "off", "--export", "yes"]).packing is False


def test_a_misspelt_flag_is_one_line_with_the_nearest_flag(capsys):
    """argparse prints its usage block above the error; ours is one line, naming the flag that was probably meant."""
    for argv, hint in (
        (["--alpah", "0.3"], "did you mean --alpha?"),
        (["--recipe", "drafts"], "invalid choice: 'drafts'"),
        (["--no_such_thing_at_all"], "see --help"),
        # a prefix of a flag is not taken as the flag (argparse's abbreviations would set --max_steps silently)
        (["--max_step", "3"], "did you mean --max_steps?"),
        (["--temp", "2"], "unrecognized arguments: --temp 2; did you mean --temperature?"),
        (["--seq", "64"], "did you mean --seq_len?"),  # the flag it starts, not the nearest spelling (--skew)
        (["--out", "o"], "did you mean --output_dir?"),
    ):
        with pytest.raises(SystemExit) as exit_:
            parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and hint in err[0], err


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["--learning_rate", "1e-4"],
            "--learning_rate is not a ds-distill flag: DeepSpeed owns it; set optimizer.params.lr",
        ),
        (
            ["--per_device_train_batch_size=8"],
            "set train_micro_batch_size_per_gpu in the JSON you pass as --deepspeed_config",
        ),
        (["--gradient_accumulation_steps", "4"], "set gradient_accumulation_steps in the JSON"),
        (["--max_grad_norm", "1"], "set gradient_clipping in the JSON"),
        (["--model_name_or_path", "m"], "--model_name_or_path is not a ds-distill flag: use --student"),
        (["--num_train_epochs", "3"], "use --max_steps (optimizer steps, not epochs)"),
        (["--lmbda", "0.5"], "use --on_policy_fraction"),
    ],
)
def test_a_hugging_face_or_trl_flag_names_where_ds_distill_takes_it(capsys, argv, line):
    """HF Trainer / TRL flags get the JSON key or the flag that takes their place, not argparse's nearest spelling
    (which for --learning_rate was --early_stopping_patience)."""
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and line in err[0], err


def test_a_familiar_flag_points_only_where_the_parser_can_take_it(capsys):
    """cache_teacher has no optimizer and no --deepspeed_config: --learning_rate is plainly unknown there."""
    from ds_distill.cache_teacher import CacheConfig

    with pytest.raises(SystemExit):
        parse_args(["--learning_rate", "1"], CacheConfig, "ds_distill.cache_teacher")
    err = capsys.readouterr().err
    assert "unrecognized arguments: --learning_rate" in err and "DeepSpeed owns" not in err, err


def test_recipes_are_training_run_files_only():
    """--recipe is the training entry point's (its run files hold train flags); cache_teacher's parser has none."""
    from ds_distill.cache_teacher import CacheConfig

    assert "--recipe" in build_parser()._option_string_actions
    assert "--recipe" not in build_parser(CacheConfig, "ds_distill.cache_teacher")._option_string_actions

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
    ):
        with pytest.raises(SystemExit) as exit_:
            parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and hint in err[0], err


def test_recipes_are_training_run_files_only():
    """--recipe is the training entry point's (its run files hold train flags); cache_teacher's parser has none."""
    from ds_distill.cache_teacher import CacheConfig

    assert "--recipe" in build_parser()._option_string_actions
    assert "--recipe" not in build_parser(CacheConfig, "ds_distill.cache_teacher")._option_string_actions

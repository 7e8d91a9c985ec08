"""The config reference is generated, and the command line takes options and overrides in any order."""
from pathlib import Path

from mal.cli import main, parser
from mal.config import DataConfig, RunConfig, field_comments, reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_docs_config_md_is_the_generated_reference():
    assert (REPO / "docs/config.md").read_text() == reference_markdown(), \
        "docs/config.md is stale: run `mal config reference > docs/config.md`"


def test_every_config_key_is_documented():
    import dataclasses
    import typing
    todo, seen = [RunConfig], set()
    while todo:
        cls = todo.pop()
        seen.add(cls)
        notes, hints = field_comments(cls), typing.get_type_hints(cls)
        nested = [hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
        todo += [c for c in nested if c not in seen]
        missing = [f.name for f in dataclasses.fields(cls)
                   if not dataclasses.is_dataclass(hints[f.name]) and not notes.get(f.name)]
        assert not missing, f"{cls.__name__}: no comment for {missing}"
    assert len(seen) == 9
    assert "fraction of each class" in field_comments(DataConfig)["holdout"]          # multi-line comments join


def test_options_after_overrides(tmp_path):
    args = parser().parse_args(["pretrain", "optim.epochs=2", "--config", "c.yaml", "model.dim=64", "--resume"])
    assert args.config == "c.yaml" and args.resume and args.overrides == ["optim.epochs=2", "model.dim=64"]


def test_config_show_and_check(capsys):
    assert main(["config", "show", "cifar10_pretrain", "optim.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out
    assert main(["config", "check", "cifar10_finetune"]) == 0
    assert main(["config", "check", "cifar10_finetune", "optim.epoch=3"]) == 2
    assert "did you mean 'optim.epochs'" in capsys.readouterr().err

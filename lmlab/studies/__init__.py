"""Studies: a paper's analysis of its own experiments, one package per paper (``lmlab/studies/<paper>/``).

An experiment names its study in its config (``study: {_target_: lmlab.studies.<paper>.<Class>}``; ``study:
null`` in ``conf/train.yaml``), so every run records it. ``lmlab report <dir>`` reads the study that the runs
under ``<dir>`` declare (``declared``), builds it (``build``: a recorded run is data, so only a class of
``lmlab.studies`` is built) and calls it: ``study(path, compare=None) -> Path`` writes the report under ``path``
and returns its path. The report's settings the user gives (``tolerance``) go to the constructor. Runs recorded
before experiments declared their study are read through the experiment config of the same ``name`` in lmlab's
own ``conf/experiment/``. Studies sit above ``lmlab.report`` and below the pipeline and the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lmlab.errors import UserError
from lmlab.run_dir import CONF, allowed_target, check_targets

KEY = "study"


def _recorded_study(config: dict, where: Path) -> dict | None:
    """The study node of one job's recorded config; a config without the key (recorded before experiments
    declared their study) reads the key of lmlab's experiment config of the same ``name``."""
    if KEY in config:
        node = config[KEY]
    else:
        experiments = (CONF / "experiment").resolve()
        name = config.get("name")
        yaml = (experiments / f"{name}.yaml").resolve() if isinstance(name, str) and name else None
        if yaml is None or not yaml.is_relative_to(experiments) or not yaml.is_file():
            return None
        node = OmegaConf.to_container(OmegaConf.load(yaml)).get(KEY)
    if node is not None and not isinstance(node, dict):
        raise UserError(f"{where} records study: {node!r}, which is not a config with a _target_: use a run "
                        "directory that `lmlab train` wrote.")
    return node


def declared(path: str | Path, first_only: bool = False) -> dict | None:
    """The study node that every job under ``path`` declares (None: they declare none). Jobs are found by their
    ``.hydra/config.yaml``; with ``first_only``, only the first one is read."""
    found: dict[str, dict | None] = {}
    for config in sorted(Path(path).rglob(".hydra/config.yaml")):
        node = _recorded_study(OmegaConf.to_container(OmegaConf.load(config)), config)
        found.setdefault(OmegaConf.to_yaml(OmegaConf.create(node or {})), node)
        if first_only:
            break
    if len(found) > 1:
        targets = sorted({str((n or {}).get("_target_")) for n in found.values()})
        raise UserError(f"the runs under {path} declare different studies ({', '.join(targets)}): pass the "
                        "directory of one experiment's runs.")
    return next(iter(found.values()), None)


def build(node: dict, where: str | Path, **settings: Any):
    """The study ``node`` names, built with the ``settings`` that are not None; only a class of
    ``lmlab.studies`` is built."""
    target = node.get("_target_")
    if not (isinstance(target, str) and target.startswith("lmlab.studies.") and allowed_target(target)):
        raise UserError(f"the runs under {where} declare the study {target!r}, which is not one of lmlab's studies "
                        "(a class of lmlab.studies): use run directories that `lmlab train` wrote.")
    check_targets(node, where)
    from hydra.utils import instantiate

    return instantiate(node, **{k: v for k, v in settings.items() if v is not None})

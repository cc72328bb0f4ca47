"""The Slurm flags ``bench sweep`` and ``bench run`` share (``--executor`` and ``--slurm-*``) and the
:class:`optimem.harness.slurm.SlurmSettings` they make (checked: UserError, exit 2)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from optimem.estimators.errors import UserError
from optimem.harness.commands.argtypes import positive_int

SLURM_FLAGS = ("slurm_partition", "slurm_gpus_per_node", "slurm_time", "slurm_account", "slurm_qos", "slurm_extra",
               "slurm_folder", "slurm_array")


def add_slurm_arguments(p: argparse.ArgumentParser, executor_help: str, *,
                        array: bool = False) -> argparse._ArgumentGroup:
    """``--executor local|slurm`` and the ``--slurm-*`` options, in a group "where runs execute" (``array``:
    with ``--slurm-array``, for sweeps)."""
    x = p.add_argument_group("where runs execute")
    x.add_argument("--executor", choices=["local", "slurm"], default=None, help=executor_help)
    x.add_argument("--slurm-partition", metavar="NAME", help="the partition jobs go to (default: the cluster's)")
    x.add_argument("--slurm-gpus-per-node", type=positive_int, metavar="N", help="GPUs each job asks for")
    x.add_argument("--slurm-time", type=positive_int, metavar="MINUTES",
                   help="each job's time limit (default: --timeout plus 5 minutes)")
    x.add_argument("--slurm-account", metavar="NAME", help="the account jobs are charged to")
    x.add_argument("--slurm-qos", metavar="NAME", help="the quality of service jobs ask for")
    x.add_argument("--slurm-extra", action="append", metavar="KEY=VALUE",
                   help="any other sbatch option, without its dashes (mem=8G, constraint=a100, cpus_per_task=4); "
                        "repeatable")
    x.add_argument("--slurm-folder", metavar="DIR",
                   help="submitit's job files and logs, and a multi-node run's rank files: a folder every node sees "
                        "(default: RESULTS.slurm/ beside the results file)")
    if array:
        x.add_argument("--slurm-array", action="store_true", default=None,
                       help="submit the sweep's runs as one Slurm job array (--jobs caps how many run at once) "
                            "instead of one job each")
    return x


def slurm_settings(args: argparse.Namespace, out: Path, *, executor: str | None, dry_run: bool = False,
                   need_sbatch: bool = True):
    """None for the local executor (UserError when a ``--slurm-*`` flag is given without ``--executor slurm``);
    else the :class:`optimem.harness.slurm.SlurmSettings` of the flags, checked (submitit installed, ``sbatch``
    on PATH unless ``need_sbatch`` is False, the partition known to ``sinfo``)."""
    given = [f for f in SLURM_FLAGS if getattr(args, f, None) is not None]
    if executor != "slurm":
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} applies to Slurm jobs: add --executor slurm")
        return None
    try:
        # lazy: pulls in submitit, which importing this module does not
        from optimem.harness.slurm import SlurmSettings, check_partition, parse_extra
    except ImportError:
        raise UserError("--executor slurm needs the package 'submitit': pip install 'optimem[slurm]'") from None
    extra = parse_extra(args.slurm_extra)
    if need_sbatch and shutil.which("sbatch") is None and not dry_run:
        raise UserError("--executor slurm: no 'sbatch' on PATH: run on a Slurm login node")
    if not dry_run:
        check_partition(args.slurm_partition)
    folder = Path(args.slurm_folder) if args.slurm_folder else out.with_name(out.name.removesuffix(".jsonl") + ".slurm")
    return SlurmSettings(folder=folder, partition=args.slurm_partition, gpus_per_node=args.slurm_gpus_per_node,
                         time_min=args.slurm_time, account=args.slurm_account, qos=args.slurm_qos, extra=extra,
                         array=bool(getattr(args, "slurm_array", None)))


__all__ = ["SLURM_FLAGS", "add_slurm_arguments", "slurm_settings"]

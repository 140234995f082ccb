"""Capture and HSDL data-parallel over several processes (GPUs) with torch.distributed.

Launched by ``torchrun`` (one process per GPU), every rank runs the same script:

- :func:`capture_routing_sharded`: rank ``r`` of ``W`` captures the ``r``-th contiguous share
  of the batches into ``out_dir/rank-0000r/`` (an ordinary trace folder), and rank 0 then writes
  ``out_dir/metadata.json`` listing every rank's shards in batch order, so
  :meth:`RoutingTrace.load(out_dir) <moecollab.trace.RoutingTrace.load>` reads the whole
  capture as one trace, token for token the one a single process would have written
  (``sequence_index`` is global);
- ``HSDL(...).fit(X)`` on every rank with the same ``X`` and ``random_state`` trains with
  DistributedDataParallel (see the ``distributed`` parameter of :class:`moecollab.hsdl.HSDL`).

``python -m moecollab.distributed`` is a launcher for both on a stage-01 trace and a stage-00
model folder (see ``--help``); the README shows the commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moecollab.artifacts import replace_folder
from moecollab.capture import capture_routing
from moecollab.models import resolve_device
from moecollab.trace import METADATA_FILE, RoutingTrace

logger = logging.getLogger(__name__)

__all__ = ["capture_routing_sharded", "rank_and_world", "shard_bounds"]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_bounds(n_items: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n_items`` (sizes differ by 1).

    Examples
    --------
    >>> [shard_bounds(10, rank, 3) for rank in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}); got {rank!r}")
    base, extra = divmod(n_items, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _batch_size(batch: Any) -> int:
    input_ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
    tensor = torch.as_tensor(input_ids)
    return 1 if tensor.ndim == 1 else int(tensor.shape[0])


def capture_routing_sharded(
    model: torch.nn.Module,
    batches: Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Capture ``batches`` with every rank of the process group, into one trace folder.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        This rank's copy of the model (on its own GPU).
    batches : sequence
        All batches, the same list on every rank (as :func:`~moecollab.capture.capture_routing`
        takes them; per-batch metadata keys travel with their batch). Rank ``r`` runs the
        ``r``-th contiguous share.
    out_dir : path-like
        The trace folder to create (on a file system every rank can write).
    overwrite : bool
        Replace an existing ``out_dir``.
    progress : bool
        Progress bar on rank 0.
    dtype : torch.dtype
        Storage dtype of the weights.

    Returns
    -------
    Path
        ``out_dir``, once every rank has finished and rank 0 has written the merged header.
    """
    rank, world = rank_and_world()
    out_dir = Path(out_dir)
    if not isinstance(batches, Sequence):
        raise ValueError("batches must be a sequence (every rank needs the same list); "
                         f"got {type(batches).__name__}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir {out_dir} already exists and is not empty; pass "
                              "overwrite=True to replace it")
    # One temporary folder, named by rank 0, holds every rank's part until the header is written.
    names = [f".{out_dir.name}.partial-{os.getpid()}" if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(names, src=0)
    staging = out_dir.parent / names[0]
    start, stop = shard_bounds(len(batches), rank, world)
    first_sequence = sum(_batch_size(batch) for batch in batches[:start])
    part = staging / f"rank-{rank:05d}"
    staging.mkdir(parents=True, exist_ok=True)
    capture_routing(model, batches[start:stop], out_dir=part, overwrite=True,
                    progress=progress and rank == 0, dtype=dtype, return_trace=False,
                    first_sequence_index=first_sequence)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        _write_merged_header(staging, world)
        replace_folder(staging, out_dir)
    if world > 1:
        torch.distributed.barrier()
    return out_dir


def _write_merged_header(folder: Path, world: int) -> None:
    """``folder/metadata.json`` listing the shards of ``rank-*/`` in rank order."""
    headers = [RoutingTrace.read_header(folder / f"rank-{rank:05d}") for rank in range(world)]
    merged = dict(headers[0])
    merged["shards"] = [
        {**shard, "routing": f"rank-{rank:05d}/{shard['routing']}",
         "tokens": f"rank-{rank:05d}/{shard['tokens']}" if shard.get("tokens") else None}
        for rank, header in enumerate(headers) for shard in header["shards"]]
    merged["n_tokens"] = sum(header["n_tokens"] for header in headers)
    merged["token_columns"] = next((h["token_columns"] for h in headers if h["token_columns"]),
                                   None)
    merged["n_ranks"] = world
    (folder / METADATA_FILE).write_text(json.dumps(merged, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------


def _init_process_group() -> torch.device:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); this rank's device."""
    if "RANK" not in os.environ:
        return resolve_device("auto")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.distributed.init_process_group("nccl", device_id=device)
        return device
    torch.distributed.init_process_group("gloo")
    return torch.device("cpu")


def _capture_command(args: argparse.Namespace, device: torch.device) -> None:
    from moecollab import data, models, tokens
    from moecollab.data.sources import SPLIT_GROUPS

    model, tokenizer = models.load_reference_model(Path(args.model), device=str(device))
    corpus = data.load_corpus(domains=args.domains or None)
    entries = corpus[corpus["split"].isin(SPLIT_GROUPS.get(args.split, (args.split,)))]
    n_domains = entries["domain"].nunique()
    blocks = tokens.pack_documents(entries, tokenizer, seq_len=args.seq_len,
                                   max_tokens_per_domain=args.max_tokens // n_domains,
                                   seed=args.seed)
    batches = list(blocks.batches(args.batch_size, tokens.token_pieces(tokenizer)))
    capture_routing_sharded(model, batches, args.out, overwrite=args.overwrite)


def _hsdl_command(args: argparse.Namespace, device: torch.device) -> None:
    from moecollab.hsdl import HSDL, save_hsdl

    trace = RoutingTrace.load(args.trace)
    X = trace.to_matrix(level="token", value=args.value)
    model = HSDL(n_atoms=tuple(args.n_atoms), n_epochs=args.n_epochs,
                 batch_size=args.batch_size, lr=args.lr, device=str(device),
                 random_state=args.seed, distributed="auto", verbose=True).fit(X)
    if rank_and_world()[0] == 0:
        save_hsdl(model, args.out)


def main(argv: Sequence[str] | None = None) -> None:
    """``torchrun --nproc-per-node N -m moecollab.distributed capture|hsdl …``."""
    parser = argparse.ArgumentParser(prog="python -m moecollab.distributed",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    capture = commands.add_parser("capture", help="stage 01's capture, one share per rank")
    capture.add_argument("--model", required=True, help="a model folder (stage 00's output)")
    capture.add_argument("--out", required=True, help="trace folder to write")
    capture.add_argument("--domains", nargs="*", default=None)
    capture.add_argument("--split", default="held_out")
    capture.add_argument("--max-tokens", type=int, default=163840)
    capture.add_argument("--seq-len", type=int, default=256)
    capture.add_argument("--batch-size", type=int, default=16)
    capture.add_argument("--seed", type=int, default=0)
    capture.add_argument("--overwrite", action="store_true")
    fit = commands.add_parser("hsdl", help="HSDL on every token, data-parallel")
    fit.add_argument("--trace", required=True, help="a trace folder")
    fit.add_argument("--out", required=True, help="folder for hsdl.safetensors and hsdl.json")
    fit.add_argument("--n-atoms", type=int, nargs="+", default=[32, 16])
    fit.add_argument("--n-epochs", type=int, default=60)
    fit.add_argument("--batch-size", type=int, default=512)
    fit.add_argument("--lr", type=float, default=0.002)
    fit.add_argument("--value", choices=("weight", "binary"), default="weight")
    fit.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    device = _init_process_group()
    try:
        {"capture": _capture_command, "hsdl": _hsdl_command}[args.command](args, device)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

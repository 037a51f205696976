"""Model + optimizer state <-> a flat dict of CPU tensors plus JSON-able metadata (what a snapshot shard holds).

Handles what safetensors cannot store directly: tied weights (stored once, recorded as aliases), sparse COO
tensors (indices + values), optimizer state holding lists of tensors (LBFGS history) and non-tensor values.
"""

from __future__ import annotations

from typing import Any

import torch

#: Where a captured tensor goes: "cpu" (host memory), "pinned" (page-locked host memory, filled without a host
#: wait: read it after an event recorded behind the capture), "device" (a copy beside the original).
PLACES = ("cpu", "pinned", "device")


def capture_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, copy: bool, where: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten model and optimizer state into tensors (placed by ``where``, see :data:`PLACES`) plus JSON-able
    metadata.

    Tied weights (one storage under several names, e.g. GPT-2's ``wte``/``lm_head``) are stored once and
    recorded as aliases, because safetensors refuses shared storage and a restore must keep the tie.
    """
    tensors: dict[str, torch.Tensor] = {}
    sparse: dict[str, list[Any]] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    skipped: list[str] = []
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            skipped.append(name)
            continue
        if not t.is_sparse:  # sparse tensors have no single storage to alias
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                   t.dtype)
            if t.numel() and key in seen:
                aliases[f"model.{name}"] = seen[key]
                continue
            seen[key] = f"model.{name}"
        _put(tensors, sparse, f"model.{name}", t, copy, where)
    scalars: dict[str, dict[str, Any]] = {}
    sequences: dict[str, dict[str, Any]] = {}
    if optimizer is not None:
        for idx, st in optimizer.state_dict()["state"].items():
            for k, v in st.items():
                name = f"optimizer.{idx}.{k}"
                if isinstance(v, torch.Tensor):
                    _put(tensors, sparse, name, v, copy, where)
                elif isinstance(v, (list, tuple)):
                    # e.g. LBFGS history: lists of tensors (and None); tensors go to the shard, the rest to JSON.
                    items = []
                    for i, item in enumerate(v):
                        if isinstance(item, torch.Tensor):
                            _put(tensors, sparse, f"{name}.{i}", item, copy, where)
                            items.append({"tensor": f"{name}.{i}"})
                        else:
                            items.append({"value": item})
                    sequences.setdefault(str(idx), {})[k] = {"tuple": isinstance(v, tuple), "items": items}
                else:
                    scalars.setdefault(str(idx), {})[k] = v
    meta = {"aliases": aliases, "optimizer_scalars": scalars, "optimizer_sequences": sequences,
            "sparse": sparse, "skipped": skipped}
    return tensors, meta


def restore_state(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Load what :func:`capture_state` produced back into ``model`` and ``optimizer`` (in place).

    The optimizer's param_groups (LR, betas, ...) are kept as they are now: the schedule is not rewound,
    the caller applies the LR backoff on top. When the live state still has the snapshot's layout (the
    common case) every tensor is copied back in place, fused per device, instead of going through
    ``load_state_dict``: the same bits, a fraction of the time.
    """
    if _restore_in_place(tensors, meta, model, optimizer):
        return
    tensors = _rebuild_sparse(tensors, meta.get("sparse", {}))
    model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    for alias, canonical in meta.get("aliases", {}).items():
        model_sd[alias[len("model.") :]] = tensors[canonical]
    live = model.state_dict()
    for name in meta.get("skipped", []):
        model_sd[name] = live[name]
    model.load_state_dict(model_sd, strict=True)
    if optimizer is None:
        return
    state: dict[int, dict[str, Any]] = {}
    in_sequences = {item["tensor"] for per in meta.get("optimizer_sequences", {}).values()
                    for seq in per.values() for item in seq["items"] if "tensor" in item}
    for k, v in tensors.items():
        if k.startswith("optimizer.") and k not in in_sequences:
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v.clone()
    for idx, kv in meta.get("optimizer_scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    for idx, per in meta.get("optimizer_sequences", {}).items():
        for key, seq in per.items():
            items = [tensors[it["tensor"]].clone() if "tensor" in it else it["value"] for it in seq["items"]]
            state.setdefault(int(idx), {})[key] = tuple(items) if seq["tuple"] else items
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    _restore_dtypes(optimizer, state)


def _restore_in_place(tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer | None) -> bool:
    """Copy a snapshot into the live tensors when each has its saved counterpart with the same shape and dtype
    and nothing else is live (no sparse, list-valued or skipped state); False, having changed nothing, when
    the general path is needed (e.g. the optimizer had no state yet when the snapshot was taken)."""
    if meta.get("sparse") or meta.get("optimizer_sequences") or meta.get("skipped"):
        return False
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    aliases = meta.get("aliases", {})
    live_model = model.state_dict()
    saved_model = [k for k in tensors if k.startswith("model.")]
    if len(saved_model) + len(aliases) != len(live_model):
        return False
    for key in saved_model:
        live = live_model.get(key[len("model."):])
        if live is None:
            return False
        pairs.append((live, tensors[key]))
    scalars: list[tuple[dict[str, Any], str, Any]] = []
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved_opt = meta.get("optimizer_scalars", {})
        seen = 0
        for idx, p in enumerate(params):
            live = optimizer.state.get(p)
            if not live:
                continue
            for k, v in live.items():
                name = f"optimizer.{idx}.{k}"
                if isinstance(v, torch.Tensor):
                    if name not in tensors:
                        return False
                    pairs.append((v, tensors[name]))
                    seen += 1
                elif k in saved_opt.get(str(idx), {}):
                    scalars.append((live, k, saved_opt[str(idx)][k]))
                else:
                    return False
        if seen != sum(1 for k in tensors if k.startswith("optimizer.")) or \
                len(scalars) != sum(len(v) for v in saved_opt.values()):
            return False
    if any(d.shape != s.shape or d.dtype != s.dtype or d.is_sparse for d, s in pairs):
        return False
    copy_pairs(pairs)
    for live, k, v in scalars:
        live[k] = v
    return True


def copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each saved tensor into its live one (same shapes and dtypes), in place: one fused copy per pair of
    devices where torch has it, so a restore costs a few launches instead of one per tensor."""
    with torch.no_grad():
        by_device: dict[tuple[torch.device, torch.device], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for d, s in pairs:
            dst, src = by_device.setdefault((d.device, s.device), ([], []))
            dst.append(d)
            src.append(s)
        for (dev, src_dev), (dst, src) in by_device.items():
            if dev == src_dev and hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(dst, src)
            else:
                for d, s in zip(dst, src, strict=True):
                    d.copy_(s)


def _restore_dtypes(optimizer: torch.optim.Optimizer, saved: dict[int, dict[str, Any]]) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of state to each parameter's dtype.

    bf16 parameters with fp32 moments (a common mixed-precision setup) would otherwise come back with bf16
    moments: a restore must be bitwise, dtype included. The saved tensor is put back on the device the loader
    chose, in its own dtype.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, per in saved.items():
        if idx >= len(params) or params[idx] not in optimizer.state:
            continue
        live = optimizer.state[params[idx]]
        for key, value in per.items():
            now = live.get(key)
            if isinstance(value, torch.Tensor) and isinstance(now, torch.Tensor) and now.dtype != value.dtype:
                live[key] = value.to(now.device)


def _put(tensors: dict[str, torch.Tensor], sparse: dict[str, list[Any]], name: str, t: torch.Tensor,
         copy: bool, where: str) -> None:
    if t.is_sparse:
        # safetensors stores dense arrays only: keep a COO tensor as its indices and values, uncoalesced as
        # it is (coalescing would re-sum duplicates in another order: not bitwise the same state).
        t = t.detach()
        tensors[f"{name}.__indices"] = take(t._indices(), copy, where)
        tensors[f"{name}.__values"] = take(t._values(), copy, where)
        sparse[name] = [list(t.shape), t.is_coalesced()]
    else:
        tensors[name] = take(t, copy, where)


def _rebuild_sparse(tensors: dict[str, torch.Tensor], sparse: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
    if not sparse:
        return tensors
    out = {k: v for k, v in tensors.items() if not k.endswith((".__indices", ".__values"))}
    for name, (shape, coalesced) in sparse.items():
        out[name] = torch.sparse_coo_tensor(tensors[f"{name}.__indices"], tensors[f"{name}.__values"], shape,
                                            is_coalesced=coalesced, check_invariants=False)
    return out


def take(t: torch.Tensor, copy: bool, where: str = "cpu") -> torch.Tensor:
    """``t`` detached and contiguous where ``where`` says (:data:`PLACES`); a host tensor is copied only when
    ``copy`` (a background write or a kept copy must not alias live memory), an accelerator's always."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone(memory_format=torch.contiguous_format) if copy else t.contiguous()
    if where == "device":
        return t.clone(memory_format=torch.contiguous_format)
    if where == "pinned":
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.to("cpu").contiguous()

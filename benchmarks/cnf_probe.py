"""Why the structured CNF trains slowly on the arithmetic circuit: the cost of one field evaluation, and NFE over training.

Two measurements behind the CNF section of ``benchmarks/results/NOTES.md``:

- ``--timing``: milliseconds of one evaluation of the velocity field and its divergence on the
  circuit's guide flow (batch 256, one thread, the best of 7 repeats of 20 calls): the masked
  network alone, with the time gates and slopes, the exact divergence in closed form (what the
  flow uses with at most two hidden layers), the same divergence summed path by path
  (``_path_divergence``, the deeper networks' method), and the Hutchinson estimate; for the
  default faithful and dense flows, the FFJORD field (``velocity_mask="full"``) and ``augment=10``,
  plus one evaluation with its backward pass (a training step's cost per solver evaluation).
- ``--configs``: short ``skl`` trainings of the circuit guide (a fixed number of steps, constant
  learning rate, batch 256) with given CNF options, recording the solver's NFE per forward
  (sampling) and inverse (density) solve over training and the symmetrised KL at the end, on the
  1,000 fixed simulations of ``circuit_seeds`` (seed 1), solved at ``eval_tol`` (default: the
  flow's own ``rtol``/``atol``), and how far the trained map is from triangular
  (:func:`off_structure_mass`: FFJORD's field may couple every coordinate; the faithful and dense
  CNFs are triangular by construction, so theirs is a check that reads zero). Counting NFE and
  steps, not seconds, keeps it independent of the machine's load.

``--from-jsonl FILE`` rebuilds the table from lines printed by earlier ``--configs`` runs.

Usage: ``python -m benchmarks cnf_probe [--timing] [--configs JSON] [--from-jsonl FILE ...] [--out NAME]``
with ``JSON`` a list of ``{"structure", "opts", "steps", "seed", "tag", "eval_tol"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from pyro_struct.dag import transitive_closure
from pyro_struct.objectives import get_objective

from .circuit import CIRCUIT_OBSERVATION, evaluate_skl, make_guide
from .circuit_seeds import EVAL_SEED
from .report import write_results

__all__ = ["main", "evaluation_costs", "probe_training", "off_structure_mass"]


def _best_ms(fn, calls: int = 20, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return round(1000 * best, 3)


#: the fields ``--timing`` compares: the default faithful and dense CNFs, the FFJORD field (every
#: coordinate), and the augmented faithful one (structure, options)
TIMED_FIELDS = (("faithful", {}), ("dense", {}), ("faithful", {"velocity_mask": "full"}), ("faithful", {"augment": 10}))


def evaluation_costs(options: dict, batch: int = 256, structure: str = "faithful", repeats: int = 7) -> dict:
    """Milliseconds of the pieces of one field evaluation of the circuit CNF (``structure``, ``options``).

    ``field_forward_backward_ms`` is one field-and-divergence evaluation with the backward pass of
    its sum through the parameters and the state (a training step's cost per solver evaluation).
    Each is the best of ``repeats`` x 20 calls (the best of many is the least disturbed by a loaded machine).
    """
    def ms(fn):
        return _best_ms(fn, repeats=repeats)

    guide = make_guide("cnf", structure, {"cnf": options}, 0)
    flow = guide.flow
    y, x = torch.randn(batch, flow.state_dim), torch.randn(batch, flow.context_dim)
    t = torch.tensor(0.5)
    inputs = torch.cat([y, x], -1)

    def forward_backward():
        yg = y.clone().requires_grad_(True)
        v, div = flow._velocity_and_divergence(yg, x, t, None)
        (v.sum() + div.sum()).backward()

    fwd_bwd = ms(forward_backward)
    with torch.no_grad():
        post = flow._gate(t)
        run = flow.net.run(inputs, post=post, need_slopes=True)
        W = [layer.masked_weight for layer in flow.net.layers]
        return {
            "structure": structure, "options": json.dumps(options), "state_dim": flow.state_dim,
            "hidden": str(flow.net.hidden_sizes), "params": int(guide.structure.num_effective_parameters),
            "diagonal_paths": int(flow._diag_paths.shape[1]),
            "net_ms": ms(lambda: flow.net.run(inputs)),
            "gated_net_with_slopes_ms": ms(lambda: flow.net.run(inputs, post=flow._gate(t), need_slopes=True)),
            "divergence_closed_form_ms": ms(lambda: flow._exact_divergence(run.slopes[:-1], run.slopes[-1])),
            "divergence_path_sum_ms": ms(lambda: flow._path_divergence(W, run.slopes[:-1], run.slopes[-1])),
            "field_and_exact_divergence_ms": ms(lambda: flow._velocity_and_divergence(y, x, t, None)),
            "field_and_hutchinson_ms": ms(lambda: flow._velocity_and_divergence(y, x, t, torch.ones_like(y))),
            "field_forward_backward_ms": fwd_bwd,
        }


def _fixed_simulations(n: int = 1000):
    probe = make_guide("grf", "faithful", {}, EVAL_SEED)
    torch.manual_seed(EVAL_SEED)  # the circuit_seeds evaluation set
    return probe.simulator().simulate(n)


def probe_training(structure: str, opts: dict, steps: int, seed: int = 0, lr: float = 1e-2, tag: str = "",
                   eval_tol: float | None = None, sims=None) -> dict:
    """Train the circuit's CNF guide for ``steps`` ``skl`` steps; NFE per solve over training and the final skl."""
    guide = make_guide("cnf", structure, {"cnf": opts}, seed)
    flow, loss_fn = guide.flow, get_objective("skl")
    fwd, inv, count = [], [], [0]

    def objective(g, simulator, batch):
        if count[0] > 0:
            fwd.append(flow.last_stats["forward"]["nfe"])
            inv.append(flow.last_stats["inverse"]["nfe"])
        flow.set_training_progress(count[0] / steps)  # after fit's own call, which sees its num_steps
        count[0] += 1
        return loss_fn(g, simulator, batch)

    guide.fit(num_steps=steps + 1, objective=objective, lr=lr, lr_schedule="constant", batch_size=256, seed=seed,
              progress=False)
    if eval_tol:
        flow.rtol = flow.atol = eval_tol
    skl, note = evaluate_skl(guide, guide.simulator(), _fixed_simulations() if sims is None else sims)
    tail = max(1, len(fwd) // 5)
    return {
        "tag": tag, "structure": structure, "options": json.dumps(opts), "seed": seed, "steps": len(fwd),
        "params": int(guide.structure.num_effective_parameters),
        "nfe_fwd_every_10": str(fwd[::10]), "nfe_inv_every_10": str(inv[::10]),
        "nfe_fwd_last20%": sum(fwd[-tail:]) / tail, "nfe_inv_last20%": sum(inv[-tail:]) / tail,
        "eval_tol": eval_tol or flow.rtol, "skl": skl, "note": note, "load_average_1min": round(os.getloadavg()[0], 2),
        **off_structure_mass(guide),
    }


def off_structure_mass(guide, num_draws: int = 16, seed: int = 0) -> dict:
    """How far a trained flow's map ``eps -> z`` at the circuit's observation is from the faithful
    pattern: the share of the squared Jacobian ``dz/deps`` ``(d, d)`` outside the reflexive closure of
    the faithful ``H`` (where a faithful flow is exactly zero) and above the diagonal of the guide's
    own order (where a lower-triangular ``dense`` flow is zero), averaged over ``num_draws`` noise draws."""
    faithful = make_guide("cnf", "faithful", {}, seed)
    d = guide.flow.dim
    order = [faithful.latent_sites.index(site) for site in guide.latent_sites]
    closure = transitive_closure(faithful.flow.adjacency[:, :d], reflexive=True)[order][:, order]
    above = torch.triu(torch.ones(d, d, dtype=torch.bool), diagonal=1)
    context = guide.posterior(**CIRCUIT_OBSERVATION).context.reshape(-1)
    torch.manual_seed(seed)
    shares = {"outside": 0.0, "above": 0.0}
    for _ in range(num_draws):
        J = torch.autograd.functional.jacobian(lambda e: guide.flow(e, context)[0], torch.randn(d)).pow(2)
        shares["outside"] += float(J[~closure].sum() / J.sum()) / num_draws
        shares["above"] += float(J[above].sum() / J.sum()) / num_draws
    return {"jacobian_outside_closure_H": shares["outside"], "jacobian_above_diagonal": shares["above"]}


def _row_from_line(r: dict) -> dict:
    """A ``--configs`` line of an earlier run (possibly printed by the first version of this probe)."""
    if "options" in r:
        return r
    return {"tag": r["tag"], "structure": r["structure"], "options": json.dumps(r["opts"]), "seed": r.get("seed", 0),
            "steps": r["steps"], "params": r["params"], "nfe_fwd_every_10": str(r["nfe_fwd_curve"]),
            "nfe_inv_every_10": str(r["nfe_inv_curve"]), "nfe_fwd_last20%": r["nfe_fwd_tail"],
            "nfe_inv_last20%": r["nfe_inv_tail"], "eval_tol": r.get("eval_tol") or 1e-5, "skl": r["skl"],
            "note": r["note"], "load_average_1min": round(r["load"], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks cnf_probe", description=__doc__.splitlines()[0])
    p.add_argument("--timing", action="store_true", help="time the pieces of one field evaluation")
    p.add_argument("--repeats", type=int, default=7, help="--timing: best of this many repeats of 20 calls")
    p.add_argument("--configs", type=json.loads, default=[], help="JSON list of training probes")
    p.add_argument("--from-jsonl", nargs="*", default=[], help="rebuild the table from earlier --configs lines")
    p.add_argument("--out", default="cnf_probe")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    rows = [dict(kind="timing", **evaluation_costs(o, structure=s, repeats=args.repeats)) for s, o in TIMED_FIELDS] if args.timing else []
    sims = _fixed_simulations() if args.configs else None
    for config in args.configs:
        rows.append(dict(kind="training", **probe_training(**config, sims=sims)))
        print(json.dumps(rows[-1]), flush=True)
    for path in args.from_jsonl:
        rows += [dict(kind="training", **_row_from_line(json.loads(line))) for line in open(path) if line.strip()]
    notes = (f"timing rows: ms per call, batch 256, 1 thread, best of {args.repeats} x 20 calls, on a shared loaded machine "
             f"(load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} at the end). "
             "training rows: skl steps at constant lr 1e-2, batch 256; NFE per solve (forward = sampling, inverse = "
             "density) every 10 steps and averaged over the last 20% of steps; skl in nats on circuit_seeds' 1,000 "
             "fixed simulations (seed 1), solved at eval_tol. jacobian_outside_closure_H / jacobian_above_diagonal: share "
             "of the squared Jacobian dz/deps at the circuit observation (16 noise draws) outside the faithful H's "
             "reflexive closure (zero for a faithful flow) and above the guide's own diagonal (zero for a "
             "lower-triangular flow).")
    columns = list(dict.fromkeys(k for r in rows for k in r))  # timing and training rows have their own columns
    write_results(args.out, rows, columns, meta={"argv": sys.argv[1:] if argv is None else argv}, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

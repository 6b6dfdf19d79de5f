"""Open-loop model error vs. horizon for chunked and one-step dynamics (MAC paper, Figure 2).

Trains :class:`macfw.nn.models.ChunkDynamics` with chunk lengths ``n`` (default 1 and 10) on the
same OGBench 'play' data with the same budget (gradient steps, batch size, network, Adam 3e-4),
then measures how far an open-loop rollout of each model drifts from real held-out trajectories:

* start states ``s_t`` are drawn from the **validation split** (episodes never trained on);
* the ``n``-step model is applied ``h / n`` times, fed the dataset's own actions
  ``a_t .. a_{t+h-1}`` one chunk at a time, and its prediction is compared with the real ``s_{t+h}``;
* error = mean squared error over observation dimensions, averaged over start states, in the
  **scaled [-1, 1] observation space** that MAC trains in (min/max per dimension, fitted on the
  validation split as in the reference code);
* horizons 10, 20, ..., 100 environment steps (multiples of every chunk length used, so each model
  lands exactly on ``t + h``).

Every start state is valid for the longest horizon, so all horizons and chunk lengths are measured
on the same starts.

Outputs in ``--out``: ``model_error.csv`` (columns ``chunk, horizon, error``; horizon in environment
steps; error = MSE in scaled [-1, 1] observation units) and ``model_error.png`` (error vs. horizon,
one line per chunk length, log-y; the dashed grey line is the error of predicting ``s_t`` itself,
i.e. "no model").

Default settings (50 generated episodes of cube-single = 50k transitions, 2 x 256 MLPs, batch 256,
20k gradient steps per model) finish in well under 10 minutes on an otherwise idle 2-core CPU,
data generation (about 1.5-3 minutes) included; a cached dataset is reused on later runs. The paper's
setting is 1M transitions (``--episodes 1000``), 4 x 1024 MLPs and many more steps.

Run::

    python experiments/model_error.py --out runs/model_error
    python experiments/model_error.py --dataset_path ~/.ogbench/data/cube-single-play-v0.npz \
        --hidden 1024,1024,1024,1024 --steps 100000 --batch 1024 --out runs/model_error_full
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(s).replace(" ", "").split(",") if x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output folder (model_error.csv, model_error.png)")
    p.add_argument("--env", default="cube-single", help="OGBench environment (default cube-single)")
    p.add_argument(
        "--episodes",
        type=int,
        default=50,
        help="training episodes to generate/use (validation: a tenth, at least 1); default 50",
    )
    p.add_argument("--episode_length", type=int, default=1001, help="environment steps per generated episode")
    p.add_argument(
        "--dataset_path",
        default=None,
        help="an official OGBench NAME.npz (NAME-val.npz beside it); nothing is generated",
    )
    p.add_argument("--cache_dir", default=None, help="dataset cache (default: $MACFW_CACHE_DIR or ~/.cache/macfw)")
    p.add_argument("--steps", type=int, default=20_000, help="gradient steps per model (default 20000)")
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--hidden", default="256,256", help="MLP hidden sizes, comma-separated (default 256,256)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    p.add_argument("--chunks", default="1,10", help="chunk lengths n to compare (default 1,10)")
    p.add_argument(
        "--horizons",
        default=",".join(str(h) for h in range(10, 101, 10)),
        help="horizons in environment steps (default 10,20,...,100); each must be a multiple of every n",
    )
    p.add_argument(
        "--num_starts",
        type=int,
        default=2000,
        help="held-out start states to average over (default 2000; fewer if the split is small)",
    )
    p.add_argument("--steps_per_dispatch", type=int, default=500, help="gradient steps per compiled call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="data-generation worker processes (default: cores)")
    args = p.parse_args(argv)
    args.hidden = _ints(args.hidden)
    args.chunks = _ints(args.chunks)
    args.horizons = _ints(args.horizons)
    if not args.chunks or not args.horizons or min(args.chunks) < 1 or min(args.horizons) < 1:
        p.error("--chunks and --horizons must be non-empty lists of positive ints")
    bad = [(h, n) for h in args.horizons for n in args.chunks if h % n]
    if bad:
        p.error(f"every horizon must be a multiple of every chunk length; not so for (horizon, n) = {bad}")
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be >= 1")
    return args


# ------------------------------------------------------------------------------------------- data
def load_splits(args):
    """Train split as macfw's :class:`LoadedData` (chunk 1) and the validation split, scaled alike.

    Returns ``(loaded, val_obs (M, ob_dim) scaled, val_actions (M, act_dim) clipped, val_traj_end (M,))``.
    ``OGBenchDataset.load`` does not return the validation split, so the OGBench loader is called
    here and :meth:`OGBenchDataset.prepare` does the rest.
    """
    import ogbench

    from macfw.data.batches import trajectory_ends
    from macfw.data.ogbench_data import ACTION_CLIP, OGBenchDataset

    # task_mode 'goal' loads the plain dataset (no reward relabelling, which needs qpos): only
    # observations and actions are used here.
    ds = OGBenchDataset(
        env_name=args.env,
        task_mode="goal",
        dataset_path=args.dataset_path,
        num_episodes=args.episodes,
        episode_length=args.episode_length,
        data_seed=0,
        cache_dir=args.cache_dir,
        workers=args.workers,
    )
    ds.check_env()
    path = ds.resolve_path()
    # OGBench's return type depends on its flags (env_only/dataset_only); these give (env, train, val).
    env, train, val = cast(
        "tuple[Any, dict, dict]",
        ogbench.make_env_and_datasets(ds.dataset_name, dataset_path=str(path), compact_dataset=True),
    )
    env.close()
    loaded = ds.prepare(train, val, chunk_len=1)
    val_obs = np.asarray(loaded.obs_scaler(np.asarray(val["observations"], np.float32)))
    val_act = np.clip(np.asarray(val["actions"], np.float32), -ACTION_CLIP, ACTION_CLIP)
    val_end = trajectory_ends(val["valids"])
    return loaded, path, val_obs, val_act, val_end


def pick_starts(traj_end: np.ndarray, max_h: int, num: int, seed: int) -> np.ndarray:
    """Up to ``num`` indices ``t`` with ``t + max_h <= traj_end[t]`` (evenly spread, deterministic)."""
    t = np.arange(len(traj_end))
    ok = np.where(t + max_h <= traj_end)[0]
    if len(ok) == 0:
        raise ValueError(
            f"No held-out trajectory is longer than the largest horizon ({max_h} steps); "
            "use longer episodes or smaller --horizons."
        )
    if len(ok) <= num:
        return ok.astype(np.int32)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ok, size=num, replace=False)).astype(np.int32)


# ------------------------------------------------------------------------------------------- training
def train_model(loaded, n: int, args, log=print):
    """Fit ``ChunkDynamics`` with chunk length ``n``; returns ``(model, final_loss, seconds)``."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    from macfw.data.batches import sample_batch, valid_starts
    from macfw.nn.models import ChunkDynamics
    from macfw.spec import Spec

    spec = Spec(ob_dim=loaded.spec.ob_dim, act_dim=loaded.spec.act_dim, goal_dim=0, chunk_len=n)
    key = jax.random.PRNGKey(args.seed)
    k_init, k_data = jax.random.split(key)
    model = ChunkDynamics(spec, key=k_init, hidden_dims=args.hidden)
    data = eqx.tree_at(lambda d: d.starts, loaded.data, jnp.asarray(valid_starts(np.asarray(loaded.data.traj_end), n)))
    opt = optax.adam(args.lr)
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = opt.init(params)

    def loss_fn(params, batch):
        m = eqx.combine(params, static)
        losses, _ = jax.vmap(m.loss)(batch["obs"], batch["actions"], batch["next_obs"])
        return jnp.mean(losses)

    @functools.partial(jax.jit, static_argnums=4)
    def run(data, params, opt_state, key, num: int):
        """``num`` Adam steps in one compiled call (``lax.scan``); batches sampled on the device."""

        def one(carry, _):
            params, opt_state, key = carry
            key, kb = jax.random.split(key)
            batch = sample_batch(data, kb, args.batch, chunk_len=n, gamma=0.99, goal_conditioned=False)
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, key), loss

        (params, opt_state, key), losses = jax.lax.scan(one, (params, opt_state, key), None, length=num)
        return params, opt_state, key, jnp.mean(losses)

    t0 = time.time()
    done, K = 0, max(1, min(args.steps_per_dispatch, args.steps))
    loss = float("nan")
    while done < args.steps:
        k = min(K, args.steps - done)
        params, opt_state, k_data, loss = run(data, params, opt_state, k_data, k)
        done += k
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"n={n}: non-finite training loss at step {done}")
        log(f"  n={n:>3}: step {done:>6}/{args.steps}  train MSE {loss:.3e}  ({time.time() - t0:.0f} s)")
    return eqx.combine(params, static), loss, time.time() - t0


# ------------------------------------------------------------------------------------------- evaluation
def open_loop_errors(model, n: int, obs, actions, starts, horizons) -> dict[int, float]:
    """MSE (scaled space) of the open-loop prediction of ``s_{t+h}`` for each horizon ``h``.

    ``model`` is applied ``h / n`` times from ``s_t`` with the real actions ``a_t .. a_{t+h-1}``.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    max_h = max(horizons)
    num_calls = max_h // n
    obs = jnp.asarray(obs)
    actions = jnp.asarray(actions)
    starts = jnp.asarray(starts)
    act_dim = actions.shape[1]

    @eqx.filter_jit
    def rollout(model, t):
        def step(s, k):
            idx = t + k * n + jnp.arange(n)
            A = actions[idx].reshape(n * act_dim)
            s_next = model(s, A)
            return s_next, s_next

        _, preds = jax.lax.scan(step, obs[t], jnp.arange(num_calls))  # preds[k] ~ s_{t + (k+1) n}
        targets = obs[t + (jnp.arange(num_calls) + 1) * n]
        return jnp.mean((preds - targets) ** 2, axis=-1)  # (num_calls,)

    errs = []
    for chunk in np.array_split(np.asarray(starts), max(1, len(starts) // 512)):
        errs.append(np.asarray(jax.vmap(lambda t: rollout(model, t))(jnp.asarray(chunk))))
    errs = np.concatenate(errs, axis=0)  # (num_starts, num_calls)
    return {h: float(np.mean(errs[:, h // n - 1])) for h in horizons}


def copy_baseline(obs, starts, horizons) -> dict[int, float]:
    """MSE of predicting ``s_t`` for ``s_{t+h}`` ("no model")."""
    return {h: float(np.mean((obs[starts + h] - obs[starts]) ** 2)) for h in horizons}


# ------------------------------------------------------------------------------------------- outputs
def write_csv(path: Path, errors: dict[int, dict[int, float]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["chunk", "horizon", "error"])
        for n in sorted(errors):
            for h in sorted(errors[n]):
                w.writerow([n, h, f"{errors[n][h]:.8g}"])


def plot(path: Path, errors, baseline, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for n in sorted(errors):
        hs = sorted(errors[n])
        ax.plot(hs, [errors[n][h] for h in hs], marker="o", label=f"n = {n}" + (" (one-step model)" if n == 1 else ""))
    if baseline:
        hs = sorted(baseline)
        ax.plot(hs, [baseline[h] for h in hs], ls="--", color="grey", label="no model (predict $s_t$)")
    ax.set_yscale("log")
    ax.set_xlabel("horizon (environment steps)")
    ax.set_ylabel("open-loop MSE (scaled [-1, 1] obs.)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg):
        print(msg, flush=True)

    loaded, path, val_obs, val_act, val_end = load_splits(args)
    t_data = time.time() - t_start
    starts = pick_starts(val_end, max(args.horizons), args.num_starts, args.seed)
    log(
        f"[model_error] data {path.name}: {loaded.num_transitions} train transitions, {len(val_obs)} held-out "
        f"(validation) transitions, {len(starts)} start states; ready in {t_data:.0f} s"
    )

    errors, train_loss = {}, {}
    for n in args.chunks:
        log(
            f"[model_error] training ChunkDynamics n={n}: {args.steps} steps, batch {args.batch}, "
            f"hidden {args.hidden}, Adam {args.lr:g}"
        )
        model, loss, secs = train_model(loaded, n, args, log=log)
        train_loss[n] = loss
        errors[n] = open_loop_errors(model, n, val_obs, val_act, starts, args.horizons)
        log(
            f"[model_error] n={n}: trained in {secs:.0f} s; open-loop MSE "
            + ", ".join(f"h{h}={errors[n][h]:.3g}" for h in args.horizons)
        )
    baseline = copy_baseline(val_obs, starts, args.horizons)

    write_csv(out / "model_error.csv", errors)
    title = (
        f"{args.env}: open-loop error on held-out trajectories\n"
        f"{loaded.num_transitions} transitions, MLP {'x'.join(map(str, args.hidden))}, "
        f"{args.steps} steps x batch {args.batch}"
    )
    plot(out / "model_error.png", errors, baseline, title)
    wall = time.time() - t_start

    show = [h for h in (10, 50, 100) if h in args.horizons] or list(args.horizons)
    log("\n[model_error] open-loop MSE in scaled [-1, 1] observation space, held-out (validation) trajectories")
    log("  horizon " + "".join(f"{'n=' + str(n):>12}" for n in args.chunks) + f"{'no model':>12}")
    for h in show:
        log(f"  {h:>7} " + "".join(f"{errors[n][h]:>12.4g}" for n in args.chunks) + f"{baseline[h]:>12.4g}")
    log(
        f"[model_error] wall time {wall:.0f} s (data {t_data:.0f} s); wrote {out / 'model_error.csv'} and "
        f"{out / 'model_error.png'}"
    )
    return {"errors": errors, "baseline": baseline, "train_loss": train_loss, "wall_time_s": wall}


if __name__ == "__main__":  # the guard matters: data generation spawns worker processes
    main(sys.argv[1:])

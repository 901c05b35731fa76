"""
VSPO's claim in its own abstraction: a softmax policy over K arms (answers).

    python -m experiments.bandit                      # ~1-2 min on 2 CPU cores, writes docs/bandit.png
    python -m experiments.bandit --seeds 5 --iters 200 --no-plot       # seconds

The arms. Each arm k is an answer with two features: correct c_k (the accuracy reward) and
behaviour b_k (the secondary behaviour, e.g. "a detailed explanation"). Under the initial
policy pi_0 half the mass is on correct answers and 2% on behaviour arms: the behaviour
is rare. A third group, decoy arms, stands for what a *misaligned* steering vector pushes
toward instead (say, rambling that never reaches an answer): neither correct nor the
behaviour, also rare under pi_0.

The reward is the composite of train.py, r_k = c_k + lam * b_k. GRPO samples G arms per
group from pi_theta and updates it with vspo.policy_loss. VSPO samples the G rollouts of a
group at intensities alpha in {0, a/2, a} from the *steered* distribution

    pi_alpha(k) = pi_theta(k) exp(alpha s_k) / sum_j pi_theta(j) exp(alpha s_j)       (1)

(the logit-space picture of adding alpha * v to the residual stream: a first-order tilt
along a steering score s), and updates the *unsteered* pi_theta with the same loss, the
same advantages, old log-probs from pi_theta (train.py's default). So GRPO is VSPO with
every alpha = 0, exactly as in train.py.

The steering score interpolates between aligned and misaligned: s = (1 - rho) b + rho d,
d the decoy indicator. Alignment is stated as a number, the total variation between the
steered distribution at the top intensity and the target distribution pi_0(. | b = 1)
(the behaviour, with everything else as the model had it):

    TV = 1/2 sum_k | pi_a(k) - pi_0(k | b_k = 1) |                                      (2)

0 would be a vector that induces exactly the behaviour; 1 one that never induces it.
The measurement: iterations until the unsteered policy shows the behaviour at least 90%
of the time, GRPO against VSPO, over many seeds, as rho goes from 0 to 1.
"""

import argparse
import os
import sys
import time

import torch

import vspo
from rollout import check_finite, parse_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_arms(n_plain=10, n_behavior=4, n_decoy=6, p_behavior=0.02, p_decoy=0.02):
    """-> correct (K,), behavior (K,), decoy (K,) as 0/1 floats, initial logits (K,).
    Plain and behaviour arms are half correct; decoys never are. Mass inside a group is uniform."""
    K = n_plain + n_behavior + n_decoy
    behavior = torch.zeros(K)
    behavior[n_plain:n_plain + n_behavior] = 1
    decoy = torch.zeros(K)
    decoy[n_plain + n_behavior:] = 1
    correct = torch.zeros(K)
    correct[:n_plain // 2] = 1
    correct[n_plain:n_plain + n_behavior // 2] = 1
    p0 = torch.full((K,), (1 - p_behavior - p_decoy) / n_plain)
    p0[behavior.bool()] = p_behavior / n_behavior
    p0[decoy.bool()] = p_decoy / n_decoy
    return correct, behavior, decoy, p0.log()


def steered_probs(logits, score, alpha):
    """Eq. (1): (..., K) logits, (K,) steering score, (...,) intensities -> (..., K) probabilities."""
    return torch.softmax(logits + alpha[..., None] * score, dim=-1)


def sample_arms(logits, score, alpha, generator):
    """One arm per row from the steered distribution of eq. (1): (N, K) logits, (N,) intensities -> (N,)."""
    return torch.multinomial(steered_probs(logits, score, alpha), 1, generator=generator).squeeze(1)


def alignment_tv(logits0, score, alpha, behavior):
    """Eq. (2): total variation between the steered distribution and pi_0 conditioned on the behaviour."""
    p0 = torch.softmax(logits0, -1)
    target = p0 * behavior / (p0 * behavior).sum()
    return 0.5 * (steered_probs(logits0, score, torch.tensor(alpha)) - target).abs().sum().item()


def train(correct, behavior, logits0, score, intensities, seeds, iters, groups=4, group_size=6, lam=1.0,
          lr=0.5, target_rate=0.9, seed=0):
    """Independent runs (one per seed) of GRPO-style training, vectorised: every row of theta (S, K) is
    its own policy. intensities: the set a group's rollouts are stratified over ([0.0] is GRPO).
    -> iterations each run took to reach `target_rate` (iters + 1 if never), and the (iters, S) curve of
    the unsteered behaviour rate."""
    S, G = seeds, group_size
    theta = logits0.repeat(S, 1).requires_grad_(True)  # (S, K)
    opt = torch.optim.SGD([theta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    alphas = vspo.intensity_schedule("stratified", intensities, G).repeat(S * groups)  # (S*groups*G,)
    owner = torch.arange(S).repeat_interleave(groups * G)  # which run each rollout belongs to
    hit = torch.full((S,), iters + 1)
    curve = []
    for it in range(iters):
        with torch.no_grad():
            rate = (torch.softmax(theta, -1) * behavior).sum(-1)  # (S,) unsteered behaviour rate
            curve.append(rate)
            hit = torch.where((rate >= target_rate) & (hit > iters), torch.full_like(hit, it), hit)
            arms = sample_arms(theta[owner], score, alphas, gen)  # (N,)
            rewards = correct[arms] + lam * behavior[arms]
            advantages, _ = vspo.group_advantages(rewards, G)
        logprobs = torch.log_softmax(theta, -1)[owner, arms][:, None]  # (N, 1) under the unsteered policy
        mask = torch.ones_like(logprobs, dtype=torch.bool)
        # normaliser = rollouts per run, so each run's parameters get exactly their own GRPO gradient
        loss, _ = vspo.policy_loss(logprobs, logprobs.detach(), advantages, mask,
                                   normalizer=float(groups * G))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return hit, torch.stack(curve)


def experiment(rhos, seeds, iters, top_intensity, lam, lr, seed, p_behavior=0.02):
    """GRPO once (the steering score does not enter it), VSPO at each alignment rho."""
    correct, behavior, decoy, logits0 = make_arms(p_behavior=p_behavior)
    grpo, grpo_curve = train(correct, behavior, logits0, behavior, [0.0], seeds, iters, lam=lam, lr=lr,
                             seed=seed)
    rows, curves = [], {"grpo": grpo_curve.mean(1)}
    for rho in rhos:
        score = (1 - rho) * behavior + rho * decoy
        steered = steered_probs(logits0, score, torch.tensor(top_intensity))
        intensities = [0.0, top_intensity / 2, top_intensity]
        hit, curve = train(correct, behavior, logits0, score, intensities, seeds, iters, lam=lam, lr=lr,
                           seed=seed)
        rows.append({"rho": rho, "tv": alignment_tv(logits0, score, top_intensity, behavior),
                     "steered_behavior": (steered * behavior).sum().item(), "grpo": grpo.tolist(),
                     "vspo": hit.tolist()})
        curves[rho] = curve.mean(1)
    return rows, curves


def quartiles(hits):
    """(lower quartile, median, upper quartile) of iteration counts."""
    return torch.quantile(torch.tensor(hits, dtype=torch.float), torch.tensor([0.25, 0.5, 0.75]))


def summarize(hits, iters):
    q = quartiles(hits)
    fmt = lambda v: f">{iters}" if v > iters else f"{v:.0f}"
    return f"{fmt(q[1])} [{fmt(q[0])}-{fmt(q[2])}]"


def print_table(rows, iters, target_rate):
    print(f"iterations until the unsteered behaviour rate reaches {target_rate:.0%}: median [quartiles] over "
          f"{len(rows[0]['grpo'])} seeds")
    print("| rho | TV(steered, target) | behaviour rate at top intensity | GRPO | VSPO | P(a VSPO run is "
          "faster than a GRPO run) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        v, g = torch.tensor(r["vspo"])[:, None], torch.tensor(r["grpo"])[None, :]
        wins = ((v < g).float() + 0.5 * (v == g).float()).mean().item()  # over all (VSPO run, GRPO run) pairs
        print(f"| {r['rho']:.2f} | {r['tv']:.2f} | {r['steered_behavior']:.2f} | "
              f"{summarize(r['grpo'], iters)} | {summarize(r['vspo'], iters)} | {wins:.2f} |")


def plot(rows, curves, iters, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    tv = [r["tv"] for r in rows]
    for algo, color in (("grpo", "tab:blue"), ("vspo", "tab:orange")):
        q = [quartiles(r[algo]) for r in rows]
        ax1.plot(tv, [x[1] for x in q], "o-", color=color, label=algo.upper())
        ax1.fill_between(tv, [x[0] for x in q], [x[2] for x in q], color=color, alpha=0.2)
    ax1.set_xlabel("misalignment: TV(steered at top intensity, pi_0(. | behaviour))")
    ax1.set_ylabel(f"iterations to 90% behaviour (cap {iters})")
    ax1.legend()
    ax2.plot(curves["grpo"], color="tab:blue", label="GRPO")
    shades = plt.cm.Oranges(torch.linspace(0.9, 0.4, len(rows)).tolist())
    for r, shade in zip(rows, shades):
        ax2.plot(curves[r["rho"]], color=shade, label=f"VSPO, TV={r['tv']:.2f}")
    ax2.set_xscale("log")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("unsteered behaviour rate (mean over seeds)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description="VSPO vs reward-shaped GRPO on a softmax bandit, aligned to "
                                            "misaligned steering.")
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--iters", type=int, default=3000, help="cap on iterations per run")
    p.add_argument("--rhos", default="0,0.25,0.5,0.6,0.7,0.8,0.9,1",
                   help="steering score (1-rho)*behaviour + rho*decoy")
    p.add_argument("--intensity", type=float, default=5.0,
                   help="top steering intensity a (groups use 0, a/2, a)")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--p-behavior", type=float, default=0.02,
                   help="the behaviour's share of the initial policy (the unsteered base rate)")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "bandit.png"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args()
    try:
        check_finite(args)
        rhos = parse_list(args.rhos, "--rhos")
        if not 0 < args.p_behavior < 0.5:
            raise ValueError("--p-behavior must be above 0 and below 0.5")
    except ValueError as e:
        sys.exit(f"error: {e}")
    torch.set_num_threads(1)
    t0 = time.time()
    rows, curves = experiment(rhos, args.seeds, args.iters, args.intensity, args.lam, args.lr, args.seed,
                              args.p_behavior)
    print_table(rows, args.iters, 0.9)
    print(f"{time.time() - t0:.0f} s")
    if not args.no_plot:
        try:
            plot(rows, curves, args.iters, args.out)
        except ImportError:
            print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()

"""Policy gradients with the log-derivative trick: REINFORCE on gymnasium's CartPole-v0 through bbvi.expectation,
with the leave-one-out baseline, without a baseline, and off-policy (each step also reuses the previous step's
episodes, importance-weighted by the balance heuristic over the current and the previous policy).

The distribution is the policy's distribution over whole episodes: `Episodes.draw(num, generator)` plays num
episodes (actions and the environment's seeds from the torch generator), `Episodes.log_prob(x)` is
sum_t log pi_theta(a_t | s_t), and f(x) is the return. grad E[return] = E[return grad log pi(episode)]: the
environment's dynamics drop out of the score, so the environment needs no gradient (Williams 1992)."""
import math
import os
import time
import warnings

import numpy as np
import pandas as pd
import torch

from common import parse, single_thread, write_table

import bbvi

OBS, MAX_STEPS, SOLVED = 4, 200, 195.0  # CartPole-v0: 200 steps at most, solved at a mean return of 195 / 100


def make_env():
    import gymnasium as gym
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # v0 is "out of date" in gymnasium's eyes; it is the one solved at 195
        return gym.make("CartPole-v0").unwrapped  # the 200-step limit is applied here, not by a wrapper


class Episodes:
    """A linear softmax policy's distribution over CartPole episodes: x (num, MAX_STEPS, OBS + 2) holds, per
    time step, the observation, the action taken and whether the episode was still running (1/0)."""

    has_rsample = False

    def __init__(self, weight, bias, envs):
        self.weight, self.bias, self.envs = weight, bias, envs

    def logits(self, obs):
        return obs @ self.weight + self.bias  # (..., 2)

    def draw(self, num, generator):
        x = torch.zeros(num, MAX_STEPS, OBS + 2, dtype=self.weight.dtype)
        if num > len(self.envs):
            raise ValueError(f"{num} episodes asked for, {len(self.envs)} environments to play them in")
        envs = self.envs[:num]
        seeds = torch.randint(2 ** 31 - 1, (num,), generator=generator).tolist()
        obs = torch.tensor(np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds)]), dtype=x.dtype)
        alive = torch.ones(num, dtype=torch.bool)
        with torch.no_grad():
            for t in range(MAX_STEPS):
                p1 = torch.softmax(self.logits(obs), -1)[:, 1]
                action = (torch.rand(num, generator=generator, dtype=x.dtype) < p1).to(x.dtype)
                x[:, t, :OBS], x[:, t, OBS], x[:, t, OBS + 1] = obs, action, alive.to(x.dtype)
                for i in torch.nonzero(alive).flatten().tolist():
                    o, _, terminated, _, _ = envs[i].step(int(action[i]))
                    obs[i] = torch.as_tensor(o, dtype=x.dtype)
                    alive[i] = not terminated
                if not alive.any():
                    break
        return x

    def log_prob(self, x):
        """(num,) sum over the steps of the episode of log pi(a_t | s_t)."""
        logp = torch.log_softmax(self.logits(x[..., :OBS]), -1)
        a = x[..., OBS].long()
        return (logp.gather(-1, a[..., None])[..., 0] * x[..., OBS + 1]).sum(-1)


class Replay:
    """The previous step's episodes, seen as draws from the previous policy (for importance sampling)."""

    has_rsample = False

    def __init__(self, x, weight, bias):
        self.x, self.old = x, Episodes(weight.detach().clone(), bias.detach().clone(), [])

    def draw(self, num, generator):
        if num != self.x.shape[0]:
            raise ValueError(f"the replay holds {self.x.shape[0]} episodes, {num} asked for")
        return self.x

    def log_prob(self, x):
        return self.old.log_prob(x)


def episode_return(x):
    return x[..., OBS + 1].sum(-1)  # reward 1 for every step the pole stays up


def train(variant, seed, max_episodes, batch=8, lr=0.02):
    """REINFORCE with Adam; returns the return of every episode played, in order, and the seconds taken."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.zeros(OBS, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    envs = [make_env() for _ in range(batch)]
    returns, replay, ess_fractions, t0 = [], None, [], time.perf_counter()
    while len(returns) < max_episodes:
        policy = Episodes(weight, bias, envs)
        played = []

        def f(x, played=played):
            played.append(x)
            return episode_return(x)
        if variant == "off-policy" and replay is not None:
            # 2 * batch draws split evenly: `batch` new episodes from the current policy, the previous ones reused
            value, info = bbvi.expectation(f, policy, num_samples=2 * batch, proposal=[policy, replay],
                                           baseline="loo", generator=g, return_info=True)
            ess_fractions.append(info["ess"] / (2 * batch))
            new = played[-1][:batch]
        else:
            value = bbvi.expectation(f, policy, num_samples=batch, estimator="score",
                                     baseline=None if variant == "no baseline" else "loo", generator=g)
            new = played[-1]
        if variant == "off-policy":
            replay = Replay(new, weight, bias)  # this step's episodes, with the policy that played them
        opt.zero_grad()
        (-value).backward()
        opt.step()
        returns.extend(episode_return(new).tolist())
    return returns, time.perf_counter() - t0, (float(np.median(ess_fractions)) if ess_fractions else math.nan)


def solved_at(returns):
    """The number of episodes played when the mean return of the last 100 first reached SOLVED, or None."""
    r = np.asarray(returns, dtype=float)
    if len(r) < 100:
        return None
    means = np.convolve(r, np.ones(100) / 100, mode="valid")
    hit = np.nonzero(means >= SOLVED)[0]
    return int(hit[0] + 100) if len(hit) else None


VARIANTS = ("LOO baseline", "no baseline", "off-policy")


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    single_thread()
    max_episodes, seeds = (48, (0,)) if args.quick else (4000, (0, 1, 2))
    rows, curves = [], {}
    for variant in VARIANTS:
        for seed in seeds:
            returns, seconds, ess = train(variant, seed, max_episodes)
            curves[variant, seed] = returns
            at = solved_at(returns)
            rows.append(dict(variant=variant, seed=seed, solved_at_episode=at if at is not None else f"> {max_episodes}",
                             final_mean_100=float(np.mean(returns[-100:])), seconds=seconds, median_ess_fraction=ess))
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    text = write_table(frame, args.out, "policy_gradient", "Policy gradients: REINFORCE on CartPole-v0",
                       f"bbvi.expectation's score path over whole episodes (linear softmax policy from zero, Adam lr "
                       f"0.02, 8 new episodes per step); solved = mean return >= {SOLVED:g} over the last 100 "
                       f"episodes; off-policy reuses the previous step's 8 episodes with balance-heuristic weights "
                       f"(ESS of the 16 weighted episodes / 16: median over steps). Every variant plays the same number of episodes.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for j, variant in enumerate(VARIANTS):
        for seed in seeds:
            r = np.asarray(curves[variant, seed], dtype=float)
            k = min(100, len(r))
            ax.plot(np.arange(k, len(r) + 1), np.convolve(r, np.ones(k) / k, mode="valid"), color=f"C{j}",
                    lw=1, label=variant if seed == seeds[0] else None)
    ax.axhline(SOLVED, color="k", ls=":", lw=1)
    ax.set_xlabel("episodes played")
    ax.set_ylabel("mean return, last 100 episodes")
    ax.set_title("REINFORCE on CartPole-v0 with bbvi.expectation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "policy_gradient.png"), dpi=120)
    plt.close(fig)
    print(text)
    return frame


if __name__ == "__main__":
    main()

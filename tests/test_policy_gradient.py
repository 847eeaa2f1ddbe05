"""experiments/policy_gradient.py: the episode distribution's log-probability and returns are what the
environment played, the off-policy weights are exact, and the experiment runs end to end in --quick mode."""
import os
import sys

import numpy as np
import torch

import bbvi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import policy_gradient as pg  # noqa: E402


def policy(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (0.5 * torch.randn(pg.OBS, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    bias = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    return pg.Episodes(weight, bias, [pg.make_env() for _ in range(8)])


def test_episodes_replay_the_environment_and_their_log_prob_is_the_policy_s():
    dist = policy()
    x = dist.draw(4, torch.Generator().manual_seed(1))
    assert x.shape == (4, pg.MAX_STEPS, pg.OBS + 2)
    returns = pg.episode_return(x)
    for i in range(4):
        n = int(returns[i])
        assert torch.all(x[i, :n, -1] == 1) and torch.all(x[i, n:, -1] == 0)
        # replay the recorded actions from the recorded start: the environment ends the episode at step n
        env = pg.make_env()
        env.reset()
        env.unwrapped.state = x[i, 0, :pg.OBS].numpy().copy()
        for t in range(n):
            np.testing.assert_allclose(env.unwrapped.state, x[i, t, :pg.OBS].numpy(), rtol=0, atol=1e-6)
            _, _, terminated, _, _ = env.step(int(x[i, t, pg.OBS]))
            assert terminated == (t == n - 1 and n < pg.MAX_STEPS)
        # log pi(episode) = sum over the played steps of log softmax(policy logits)[action]
        with torch.no_grad():
            lp = sum(float(torch.log_softmax(dist.logits(x[i, t, :pg.OBS]), -1)[int(x[i, t, pg.OBS])])
                     for t in range(n))
        assert abs(float(dist.log_prob(x[i:i + 1]).detach()[0]) - lp) < 1e-9


def test_reinforce_gradient_matches_on_and_off_policy_on_the_same_episodes():
    """The off-policy weights of episodes the policy itself played are all 1 (MIS over [policy, replay of the
    same parameters]), so the gradient is the on-policy one."""
    dist = policy()
    x = dist.draw(8, torch.Generator().manual_seed(2))
    replay = pg.Replay(x, dist.weight, dist.bias)

    class Fixed(pg.Episodes):  # the same policy, drawing the recorded episodes
        def draw(self, num, generator):
            return x
    same = Fixed(dist.weight, dist.bias, [])
    on = bbvi.expectation(pg.episode_return, same, num_samples=8, estimator="score", baseline="loo")
    off, info = bbvi.expectation(pg.episode_return, same, num_samples=8, proposal=replay, baseline="loo",
                                 return_info=True)
    assert abs(info["ess"] - 8.0) < 1e-9
    g_on = torch.autograd.grad(on, [dist.weight, dist.bias])
    g_off = torch.autograd.grad(off, [dist.weight, dist.bias])
    for a, b in zip(g_on, g_off):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert float(sum(a.abs().sum() for a in g_on)) > 0


def test_policy_gradient_experiment_quick(tmp_path):
    frame = pg.main(["--out", str(tmp_path), "--quick"])
    assert set(frame.variant) == set(pg.VARIANTS)
    assert (frame.final_mean_100 > 5).all()  # every episode lasts some steps
    assert (tmp_path / "policy_gradient.png").stat().st_size > 5000
    assert (tmp_path / "policy_gradient.md").read_text().count("|") > 10

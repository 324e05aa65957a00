"""rlhf_core.ppo against plainly written references.

Every reference below loops over Python floats, one element at a time, and shares no code with the
vectorised implementation. Inputs are random, with ragged masks (rows of different lengths, some
starting mid-row as a response does after a left-padded prompt), and padding is filled with garbage
so any leak shows up.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core import ppo

TOL = dict(rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Inputs and plain references
# ---------------------------------------------------------------------------------------------


def ragged_mask(B: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """(B, T) float mask, one contiguous run per row, at a random offset and of random length >= 1.

    Row 0 starts at 0 and row 1 ends at T - 1, so both edges are always covered.
    """
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        length = int(torch.randint(1, T + 1, (1,), generator=generator))
        start = int(torch.randint(0, T - length + 1, (1,), generator=generator))
        if b == 0:
            start = 0
        if b == 1:
            start = T - length
        mask[b, start : start + length] = 1.0
    return mask


def with_garbage(values: torch.Tensor, mask: torch.Tensor, garbage: float = 1e6) -> torch.Tensor:
    """Copy of values whose padded positions hold a huge number, which must never matter."""
    return torch.where(mask > 0, values, torch.full_like(values, garbage))


def real_items(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [float(v) for v, m in zip(values.flatten().tolist(), mask.flatten().tolist()) if m]


def ref_mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def ref_var(xs: list[float], unbiased: bool = True) -> float:
    mu = ref_mean(xs)
    n = len(xs)
    return sum((x - mu) ** 2 for x in xs) / (n - 1 if unbiased else n)


def ref_gae_row(rewards, values, gamma, lam, dones=None, last_value=None):
    """GAE for one row, written straight from the definition: A_t = sum_l (gamma lam)^l delta_{t+l},
    summing forward until the episode ends. Lists of floats in, lists of floats out."""
    T = len(rewards)
    dones = dones or [False] * T

    def next_value(t):
        if dones[t]:
            return 0.0
        if t + 1 < T:
            return values[t + 1]
        return 0.0 if last_value is None else last_value

    deltas = [rewards[t] + gamma * next_value(t) - values[t] for t in range(T)]
    advantages = []
    for t in range(T):
        total, weight = 0.0, 1.0
        for k in range(t, T):
            total += weight * deltas[k]
            if dones[k]:
                break
            weight *= gamma * lam
        advantages.append(total)
    return advantages


def ref_gae_masked(rewards, values, mask, gamma, lam):
    """Language-model GAE: run the plain reference on each row's real slice only."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        row = ref_gae_row([float(rewards[b, t]) for t in idx], [float(values[b, t]) for t in idx], gamma, lam)
        for t, a in zip(idx, row):
            adv[b][t] = a
    return torch.tensor(adv, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_mean_and_var_match_plain_formulas(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    mask = ragged_mask(5, 9, g)
    xs = real_items(x, mask)
    noisy = with_garbage(x, mask)

    assert float(ppo.masked_mean(noisy, mask)) == pytest.approx(ref_mean(xs), rel=1e-12)
    assert float(ppo.masked_var(noisy, mask)) == pytest.approx(ref_var(xs), rel=1e-12)
    assert float(ppo.masked_var(noisy, mask, unbiased=False)) == pytest.approx(ref_var(xs, False), rel=1e-12)

    per_row = ppo.masked_mean(noisy, mask, dim=1)
    for b in range(5):
        assert float(per_row[b]) == pytest.approx(ref_mean(real_items(x[b], mask[b])), rel=1e-12)


def test_masked_mean_ignores_nan_padding_and_accepts_bool_mask():
    x = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), 4.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert float(ppo.masked_mean(x, mask)) == pytest.approx(13.0 / 4.0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_plain_formula(shift_mean):
    g = torch.Generator().manual_seed(3)
    x = 3.0 + 2.0 * torch.randn(6, 11, generator=g, dtype=torch.float64)
    mask = ragged_mask(6, 11, g)
    xs = real_items(x, mask)
    mu, sd = ref_mean(xs), math.sqrt(ref_var(xs) + 1e-8)

    out = ppo.masked_whiten(with_garbage(x, mask), mask, shift_mean=shift_mean)
    for b in range(6):
        for t in range(11):
            if mask[b, t]:
                expected = (float(x[b, t]) - mu) / sd + (0.0 if shift_mean else mu)
                assert float(out[b, t]) == pytest.approx(expected, rel=1e-10, abs=1e-12)
            else:
                assert float(out[b, t]) == 0.0
    whitened_real = real_items(out, mask)
    assert ref_mean(whitened_real) == pytest.approx(0.0 if shift_mean else mu, abs=1e-10)
    assert ref_var(whitened_real) == pytest.approx(1.0, rel=1e-6)


def test_masked_whiten_does_not_depend_on_padding_layout():
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randn(n, generator=g, dtype=torch.float64) for n in (3, 7, 5)]
    left = torch.zeros(3, 9, dtype=torch.float64)
    left_mask = torch.zeros_like(left)
    right = torch.full((3, 12), -7.0, dtype=torch.float64)
    right_mask = torch.zeros_like(right)
    for b, s in enumerate(seqs):
        left[b, 9 - len(s) :], left_mask[b, 9 - len(s) :] = s, 1.0
        right[b, 2 : 2 + len(s)], right_mask[b, 2 : 2 + len(s)] = s, 1.0
    a = ppo.masked_whiten(left, left_mask)
    b_ = ppo.masked_whiten(right, right_mask)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(a[b, 9 - len(s) :], b_[b, 2 : 2 + len(s)], **TOL)


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def test_gae_hand_computed_example():
    # One response of three tokens, reward only at the end (the language-model shape), gamma = 1.
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    mask = torch.ones_like(rewards)
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas: 0 + 0.6 - 0.5 = 0.1, 0 + 0.7 - 0.6 = 0.1, 1 + 0 - 0.7 = 0.3 (nothing after the end)
    # A_2 = 0.3; A_1 = 0.1 + 0.5 * 0.3 = 0.25; A_0 = 0.1 + 0.5 * 0.25 = 0.225
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3]], dtype=torch.float64), **TOL)
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0]], dtype=torch.float64), **TOL)


def test_gae_with_lambda_one_gives_discounted_return_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    values = torch.tensor([[0.3, -0.2, 0.9, 0.1]], dtype=torch.float64)
    gamma = 0.9
    adv, ret = ppo.gae(rewards, values, torch.ones_like(rewards), gamma=gamma, lam=1.0)
    discounted = [sum(gamma ** (k - t) * float(rewards[0, k]) for k in range(t, 4)) for t in range(4)]
    torch.testing.assert_close(ret[0], torch.tensor(discounted, dtype=torch.float64), **TOL)
    torch.testing.assert_close(adv, ret - values, **TOL)


@pytest.mark.parametrize("seed,gamma,lam", [(0, 1.0, 0.95), (1, 0.99, 0.9), (2, 0.5, 1.0), (3, 0.9, 0.0)])
def test_gae_ragged_masks_match_plain_reference(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    B, T = 7, 10
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = ragged_mask(B, T, g)

    adv, ret = ppo.gae(with_garbage(rewards, mask), with_garbage(values, mask), mask, gamma=gamma, lam=lam)
    expected = ref_gae_masked(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, expected, **TOL)
    torch.testing.assert_close(ret, torch.where(mask > 0, expected + values, 0.0), **TOL)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_padding_invariance():
    """The same response gives the same advantages alone, left-padded, right-padded or batched."""
    g = torch.Generator().manual_seed(5)
    n = 6
    r = torch.randn(n, generator=g, dtype=torch.float64)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    alone, _ = ppo.gae(r[None], v[None], torch.ones(1, n, dtype=torch.float64), gamma=0.97, lam=0.9)

    for offset, T in [(0, 9), (3, 9), (4, 10), (2, 8)]:
        rewards = torch.randn(3, T, generator=g, dtype=torch.float64)  # other rows: other data
        values = torch.randn(3, T, generator=g, dtype=torch.float64)
        mask = torch.ones(3, T, dtype=torch.float64)
        mask[1] = 0.0
        mask[1, offset : offset + n] = 1.0
        rewards[1, offset : offset + n] = r
        values[1, offset : offset + n] = v
        rewards[1] = with_garbage(rewards[1], mask[1], garbage=float("nan"))
        values[1] = with_garbage(values[1], mask[1], garbage=float("inf"))
        adv, _ = ppo.gae(rewards, values, mask, gamma=0.97, lam=0.9)
        torch.testing.assert_close(adv[1, offset : offset + n], alone[0], **TOL)
        assert torch.all(adv[1][mask[1] == 0] == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_gym_layout_with_dones_and_bootstrap(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, gamma, lam = 4, 12, 0.99, 0.95
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    dones = torch.rand(B, T, generator=g) < 0.2
    dones[0, -1] = True  # an episode that ends exactly at the rollout's end: no bootstrap
    dones[1] = False  # one that runs through the whole rollout: bootstrapped
    last_values = torch.randn(B, generator=g, dtype=torch.float64)

    adv, ret = ppo.gae(rewards, values, torch.ones(B, T), gamma, lam, dones=dones, last_values=last_values)
    for b in range(B):
        expected = ref_gae_row(
            rewards[b].tolist(),
            values[b].tolist(),
            gamma,
            lam,
            dones=dones[b].tolist(),
            last_value=float(last_values[b]),
        )
        torch.testing.assert_close(adv[b], torch.tensor(expected, dtype=torch.float64), **TOL)
    torch.testing.assert_close(ret, adv + values, **TOL)


def test_gae_does_not_bootstrap_across_an_episode_end():
    rewards = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.0, 100.0, 0.0]], dtype=torch.float64)
    dones = torch.tensor([[True, False, False]])
    adv, _ = ppo.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0, dones=dones)
    assert float(adv[0, 0]) == pytest.approx(1.0)  # the 100 after the episode end never leaks in


# ---------------------------------------------------------------------------------------------
# Losses and diagnostics
# ---------------------------------------------------------------------------------------------


def ref_policy_loss(logp, old_logp, adv, mask, eps):
    terms, clipped_out, active = [], [], []
    columns = (logp.flatten().tolist(), old_logp.flatten().tolist(), adv.flatten().tolist(), mask.flatten().tolist())
    for lp, olp, a, m in zip(*columns):
        if not m:
            continue
        ratio = math.exp(lp - olp)
        surrogate = ratio * a
        surrogate_clipped = min(max(ratio, 1 - eps), 1 + eps) * a
        terms.append(-min(surrogate, surrogate_clipped))
        clipped_out.append(1.0 if abs(ratio - 1) > eps else 0.0)
        active.append(1.0 if -surrogate_clipped > -surrogate else 0.0)
    return ref_mean(terms), ref_mean(clipped_out), ref_mean(active)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_matches_plain_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, eps = 6, 8, 0.2
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    new = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = ragged_mask(B, T, g)

    loss, stats = ppo.policy_loss(new, old, with_garbage(adv, mask), mask, eps)
    exp_loss, exp_clipfrac, exp_active = ref_policy_loss(new.detach(), old, adv, mask, eps)
    assert float(loss.detach()) == pytest.approx(exp_loss, rel=1e-12)
    assert float(stats["clipfrac"]) == pytest.approx(exp_clipfrac, abs=1e-12)
    assert float(stats["clip_active_frac"]) == pytest.approx(exp_active, abs=1e-12)
    ratios = [math.exp(a - b) for a, b in zip(real_items(new.detach(), mask), real_items(old, mask))]
    assert float(stats["ratio_mean"]) == pytest.approx(ref_mean(ratios), rel=1e-12)
    assert float(stats["approx_kl"]) == pytest.approx(ref_mean([(r - 1) - math.log(r) for r in ratios]), rel=1e-10)

    # Gradient flows only through positions whose clipped term is not the active one, and not padding.
    loss.backward()
    n = mask.sum()
    for b in range(B):
        for t in range(T):
            ratio = math.exp(float(new.detach()[b, t] - old[b, t]))
            a = float(adv[b, t])
            is_clipped = (a > 0 and ratio > 1 + eps) or (a < 0 and ratio < 1 - eps)
            expected = 0.0 if (not mask[b, t] or is_clipped) else -a * ratio / float(n)
            assert float(new.grad[b, t]) == pytest.approx(expected, abs=1e-12)


def test_clip_fraction_on_constructed_ratios():
    eps = 0.2
    ratios = torch.tensor([[0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 2.0, 1.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.float64)  # the last one is padding
    # outside [0.8, 1.2]: 0.5, 0.79, 1.21, 2.0 -> 4 of 7 real positions
    assert float(ppo.clip_fraction(ratios, mask, eps)) == pytest.approx(4 / 7)

    # Through policy_loss: with positive advantages only ratios above 1 + eps are clipped (active);
    # the clip fraction counts both sides.
    old = torch.zeros_like(ratios)
    _, stats = ppo.policy_loss(ratios.log(), old, torch.ones_like(ratios), mask, eps)
    assert float(stats["clipfrac"]) == pytest.approx(4 / 7)
    assert float(stats["clip_active_frac"]) == pytest.approx(2 / 7)
    _, stats = ppo.policy_loss(ratios.log(), old, -torch.ones_like(ratios), mask, eps)
    assert float(stats["clip_active_frac"]) == pytest.approx(2 / 7)  # 0.5 and 0.79


def test_clipped_objective_values_for_a_few_ratios():
    """loss = -min(r A, clip(r) A) per position, for A = +1 and A = -1."""
    eps = 0.2
    ratios = [0.5, 0.9, 1.0, 1.1, 1.5]
    expected_pos = [-0.5, -0.9, -1.0, -1.1, -1.2]  # A > 0: gains stop at 1 + eps
    expected_neg = [0.8, 0.9, 1.0, 1.1, 1.5]  # A < 0: gains stop at 1 - eps, losses never clipped
    for r, ep, en in zip(ratios, expected_pos, expected_neg):
        lp = torch.tensor([[math.log(r)]], dtype=torch.float64)
        zero, one = torch.zeros_like(lp), torch.ones_like(lp)
        assert float(ppo.policy_loss(lp, zero, one, one, eps)[0]) == pytest.approx(ep)
        assert float(ppo.policy_loss(lp, zero, -one, one, eps)[0]) == pytest.approx(en)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_plain_reference(clip):
    g = torch.Generator().manual_seed(7)
    B, T = 5, 9
    old_v = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = old_v + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    R = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = ragged_mask(B, T, g)

    loss, stats = ppo.value_loss(v, old_v, with_garbage(R, mask), mask, clip)
    terms, clipped_bigger = [], []
    for vi, ovi, ri in zip(real_items(v, mask), real_items(old_v, mask), real_items(R, mask)):
        plain = (vi - ri) ** 2
        if clip is None:
            terms.append(plain)
            clipped_bigger.append(0.0)
        else:
            vc = ovi + min(max(vi - ovi, -clip), clip)
            terms.append(max(plain, (vc - ri) ** 2))
            clipped_bigger.append(1.0 if (vc - ri) ** 2 > plain else 0.0)
    assert float(loss) == pytest.approx(0.5 * ref_mean(terms), rel=1e-12)
    assert float(stats["vf_clipfrac"]) == pytest.approx(ref_mean(clipped_bigger), abs=1e-12)
    if clip is not None:
        assert 0 < float(stats["vf_clipfrac"]) < 1  # the test inputs exercise both branches


def test_entropy_from_logits_matches_plain_formula_and_is_stable():
    g = torch.Generator().manual_seed(8)
    logits = 3 * torch.randn(4, 5, 7, generator=g, dtype=torch.float64)
    h = ppo.entropy_from_logits(logits)
    assert h.shape == (4, 5)
    for i in range(4):
        for j in range(5):
            zs = logits[i, j].tolist()
            zmax = max(zs)
            exps = [math.exp(z - zmax) for z in zs]
            ps = [e / sum(exps) for e in exps]
            assert float(h[i, j]) == pytest.approx(-sum(p * math.log(p) for p in ps), rel=1e-10)

    # Huge logits would overflow a naive exp; uniform over 4 gives log 4; -inf entries count as zero.
    big = torch.tensor([1e4, 1e4, 1e4, 1e4], dtype=torch.float64)
    assert float(ppo.entropy_from_logits(big)) == pytest.approx(math.log(4))
    masked = torch.tensor([0.0, 0.0, float("-inf")], dtype=torch.float64, requires_grad=True)
    h = ppo.entropy_from_logits(masked)
    assert float(h.detach()) == pytest.approx(math.log(2))
    h.backward()
    assert torch.isfinite(masked.grad).all()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate_matches_plain_formulas(estimator):
    g = torch.Generator().manual_seed(9)
    logprobs = torch.randn(4, 6, generator=g, dtype=torch.float64) - 1
    ref_logprobs = logprobs + 0.2 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    got = ppo.kl_estimate(logprobs, ref_logprobs, estimator)
    assert got.shape == (4, 6)
    for lp, ref, value in zip(logprobs.flatten().tolist(), ref_logprobs.flatten().tolist(), got.flatten().tolist()):
        r = math.exp(ref - lp)  # pi_ref(a) / pi(a), the action sampled from pi (the first argument)
        expected = {"k1": -math.log(r), "k2": 0.5 * math.log(r) ** 2, "k3": (r - 1) - math.log(r)}[estimator]
        assert value == pytest.approx(expected, rel=1e-10, abs=1e-12)
    if estimator != "k1":
        assert torch.all(got >= 0)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        ppo.kl_estimate(logprobs, ref_logprobs, "k4")


def test_kl_estimate_estimates_the_kl_of_the_sampling_distribution_first():
    """Samples from p, kl_estimate(log p, log q) averages to the exact KL(p || q), not KL(q || p)."""
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.8, 0.15, 0.05], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    reverse = float((q * (q / p).log()).sum())
    assert abs(exact - reverse) > 0.02  # the two directions really differ for these distributions
    actions = torch.multinomial(p, 200_000, replacement=True)
    for estimator in ("k1", "k3"):  # the unbiased ones
        estimate = float(ppo.kl_estimate(p.log()[actions], q.log()[actions], estimator).mean())
        assert estimate == pytest.approx(exact, rel=0.03)


def test_explained_variance_matches_plain_formula():
    g = torch.Generator().manual_seed(10)
    R = torch.randn(3, 8, generator=g, dtype=torch.float64)
    V = R + 0.5 * torch.randn(3, 8, generator=g, dtype=torch.float64)
    mask = ragged_mask(3, 8, g)
    r, v = real_items(R, mask), real_items(V, mask)
    expected = 1 - ref_var([a - b for a, b in zip(r, v)], False) / ref_var(r, False)
    assert ppo.explained_variance(with_garbage(V, mask), R, mask) == pytest.approx(expected, rel=1e-10)
    assert ppo.explained_variance(R, R) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(R, float(R.mean())), R) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(ppo.explained_variance(R, torch.ones_like(R)))


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------


def test_fixed_kl_controller_stays_put():
    ctl = ppo.FixedKLController(0.05)
    ctl.update(current_kl=10.0, n_steps=256)
    assert ctl.value == 0.05


def test_adaptive_kl_controller_moves_toward_target_and_matches_formula():
    ctl = ppo.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=9.0, n_steps=256)  # KL too high: error clipped to +0.2, beta goes up
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    before = ctl.value
    ctl.update(current_kl=5.4, n_steps=256)  # KL a little low: error -0.1, beta goes down
    assert ctl.value == pytest.approx(before * (1 - 0.1 * 256 / 10_000))
    before = ctl.value
    ctl.update(current_kl=6.0, n_steps=256)  # on target: unchanged
    assert ctl.value == pytest.approx(before)

    # Over many updates with KL persistently low, beta keeps falling; persistently high, it rises.
    low, high = ppo.AdaptiveKLController(0.1, 6.0, 10_000), ppo.AdaptiveKLController(0.1, 6.0, 10_000)
    for _ in range(50):
        low.update(1.0, 256)
        high.update(20.0, 256)
    assert low.value < 0.1 * 0.8 and high.value > 0.1 * 1.2


def test_kl_controllers_state_dict_round_trip():
    ctl = ppo.AdaptiveKLController(0.2, target=3.0, horizon=5000)
    for kl in (1.0, 5.0, 2.0):
        ctl.update(kl, 128)
    restored = ppo.AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    ctl.update(4.0, 128)
    restored.update(4.0, 128)
    assert restored.value == ctl.value

    fixed = ppo.FixedKLController(0.3)
    other = ppo.FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3


def test_functions_accept_float32_and_flat_minibatches():
    """The gym agent passes flat (N,) minibatches in float32."""
    g = torch.Generator().manual_seed(11)
    logp = torch.randn(64, generator=g)
    adv = torch.randn(64, generator=g)
    mask = torch.ones(64)
    loss, stats = ppo.policy_loss(logp, logp, adv, mask, 0.2)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(-float(adv.mean()), rel=1e-5)  # ratio 1 everywhere
    assert float(stats["clipfrac"]) == 0.0 and float(stats["approx_kl"]) == 0.0
    whitened = ppo.masked_whiten(adv, mask)
    assert float(whitened.mean()) == pytest.approx(0.0, abs=1e-6)

"""Tests for the error-feedback algebra of fedsim.strategies.compressed (ef21, econtrol, plain).

The library functions are replayed on small heterogeneous problems and compared with a
DIRECT transcription of the update equations written inline here (loops over clients, plain
numpy, an inline Top-K), over >= 10 rounds with partial participation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedsim.strategies.compressed.base import model_step
from fedsim.strategies.compressed.compressors import (
    Compressor,
    Identity,
    RandK,
    ScaledSign,
    TopK,
)
from fedsim.strategies.compressed.econtrol import (
    EControlClientState,
    EControlServerState,
    econtrol_client_step,
    econtrol_init_client,
    econtrol_server_step,
)
from fedsim.strategies.compressed.ef21 import (
    EF21ClientState,
    EF21ServerState,
    ef21_client_scale,
    ef21_client_step,
    ef21_init_client,
    ef21_server_step,
    ef21_sgdm_client_step,
    ef21_weights,
)
from fedsim.strategies.compressed.plain import compressed_client_step, compressed_server_mean

N = 5
Grad = Callable[[int, np.ndarray], np.ndarray]
RTOL = 1e-6


# ------------------------------------------------------------------------------ problems


class Quadratic:
    """f_i(x) = 0.5 x^T A_i x - b_i^T x with client-dependent curvature and minimisers."""

    def __init__(self, n: int = N, d: int = 12, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.A, self.b = [], []
        for i in range(n):
            q, _ = np.linalg.qr(rng.standard_normal((d, d)))
            eig = rng.uniform(0.5, 1.0, d) * (1 + i)  # heterogeneous L_i
            self.A.append(q @ np.diag(eig) @ q.T)
            self.b.append(rng.standard_normal(d) * (1 + i))
        self.L = np.array([np.linalg.eigvalsh(a).max() for a in self.A])
        self.d = d

    def grad(self, i: int, x: np.ndarray) -> np.ndarray:
        return (self.A[i] @ x.astype(np.float64) - self.b[i]).astype(np.float32)

    def full_grad(self, x: np.ndarray) -> np.ndarray:
        return np.mean([self.A[i] @ x.astype(np.float64) - self.b[i] for i in range(len(self.A))], axis=0)


class Logistic:
    """f_i(x) = mean_j log(1 + exp(-y_j a_j^T x)) + lam/2 ||x||^2, shifted features per client."""

    def __init__(self, n: int = N, d: int = 10, m: int = 30, lam: float = 0.1, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.data = []
        for i in range(n):
            a = rng.standard_normal((m, d)) + rng.standard_normal(d) * (i + 1) * 0.5
            y = np.where(rng.random(m) < 0.3 + 0.1 * i, 1.0, -1.0)
            self.data.append((a, y))
        self.lam = lam
        self.d = d

    def grad(self, i: int, x: np.ndarray) -> np.ndarray:
        a, y = self.data[i]
        z = y * (a @ x.astype(np.float64))
        s = 1.0 / (1.0 + np.exp(z))
        return (-(a * (y * s)[:, None]).mean(axis=0) + self.lam * x).astype(np.float32)


def schedule(rounds: int, seed: int = 123) -> list[list[int]]:
    """Seeded partial-participation schedule: 2 or 3 of the N clients per round."""
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(N, size=int(rng.integers(2, 4)), replace=False).tolist()) for _ in range(rounds)]


def topk_ref(v: np.ndarray, k: int) -> np.ndarray:
    """Inline Top-K: keep the k entries of largest |v|."""
    idx = np.argsort(-np.abs(v), kind="stable")[:k]
    out = np.zeros_like(v)
    out[idx] = v[idx]
    return out


# ------------------------------------------------------------------------------ drivers (library)


def run_ef21_lib(
    grad: Grad,
    x0: np.ndarray,
    comp: Compressor,
    gamma: float,
    sched: list[list[int]],
    weights: np.ndarray | None = None,
    sgdm_eta: float | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[EF21ClientState]]:
    """Drive the library: uncompressed first round with everyone, then sampled rounds."""
    w = ef21_weights(None, N) if weights is None else weights
    scale = [ef21_client_scale(w, i) for i in range(N)]
    x = x0.copy()
    server = EF21ServerState.zeros(x0.size)
    clients: list[EF21ClientState] = []
    msgs = {}
    for i in range(N):
        m, st = ef21_init_client(grad(i, x), scale=scale[i], momentum=sgdm_eta is not None)
        clients.append(st)
        msgs[i] = m.decoded
    server = ef21_server_step(server, msgs, N, weights)
    x = model_step(x, server.g, gamma)
    xs, gs = [x.copy()], [server.g.copy()]
    for t, sampled in enumerate(sched):
        msgs = {}
        for i in sampled:
            rng = np.random.default_rng([t, i])
            if sgdm_eta is None:
                m, clients[i] = ef21_client_step(clients[i], grad(i, x), comp, rng, scale=scale[i])
            else:
                m, clients[i] = ef21_sgdm_client_step(clients[i], grad(i, x), comp, sgdm_eta, rng, scale=scale[i])
            msgs[i] = comp.decode(m.payload, x.size)  # what the server would decode
        server = ef21_server_step(server, msgs, N, weights)
        x = model_step(x, server.g, gamma)
        xs.append(x.copy())
        gs.append(server.g.copy())
    return xs, gs, clients


def run_econtrol_lib(
    grad: Grad,
    x0: np.ndarray,
    comp: Compressor,
    gamma: float,
    eta: float,
    sched: list[list[int]],
    init_compressor: Compressor | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[EControlClientState]]:
    x = x0.copy()
    server = EControlServerState.zeros(x0.size)
    clients: list[EControlClientState] = []
    msgs = {}
    for i in range(N):
        m, st = econtrol_init_client(grad(i, x), init_compressor, np.random.default_rng([99, i]))
        clients.append(st)
        msgs[i] = m.decoded
    server = econtrol_server_step(server, msgs, N)
    x = model_step(x, server.h, gamma)
    xs, hs = [x.copy()], [server.h.copy()]
    for t, sampled in enumerate(sched):
        msgs = {}
        for i in sampled:
            m, clients[i] = econtrol_client_step(clients[i], grad(i, x), comp, eta, np.random.default_rng([t, i]))
            msgs[i] = comp.decode(m.payload, x.size)
        server = econtrol_server_step(server, msgs, N)
        x = model_step(x, server.h, gamma)
        xs.append(x.copy())
        hs.append(server.h.copy())
    return xs, hs, clients


# ------------------------------------------------------------------------------ EF21 replay


@pytest.mark.parametrize("problem", [Quadratic(), Logistic()], ids=["quadratic", "logistic"])
@pytest.mark.parametrize("weighted", [False, True], ids=["ef21-pp", "ef21-w-pp"])
def test_ef21_pp_matches_direct_transcription(problem: Quadratic | Logistic, weighted: bool) -> None:
    rounds, k = 15, 3
    sched = schedule(rounds)
    x0 = np.random.default_rng(5).standard_normal(problem.d).astype(np.float32)
    gamma = 0.02
    if weighted:
        L = problem.L if isinstance(problem, Quadratic) else np.arange(1.0, N + 1)
        w = L / L.sum()
    else:
        w = np.full(N, 1.0 / N)

    # --- direct transcription of EF21-PP / EF21-W:
    #     g_i = a_i grad_i(x0), g = sum_i w_i g_i, a_i = 1/(n w_i); then each round
    #     x <- x - gamma g; for i in S: c_i = TopK(a_i grad_i(x) - g_i); g_i += c_i;
    #     g += sum_{i in S} w_i c_i
    a = [float(1.0 / (N * w[i])) for i in range(N)]
    x = x0.copy()
    g_i = [(np.float32(a[i]) * problem.grad(i, x)) if weighted else problem.grad(i, x) for i in range(N)]
    g = np.zeros(problem.d, np.float32)
    for i in range(N):
        g = g + np.float32(w[i]) * g_i[i]
    x = x - np.float32(gamma) * g
    ref_x, ref_g = [x.copy()], [g.copy()]
    for sampled in sched:
        c = {}
        for i in sampled:
            target = np.float32(a[i]) * problem.grad(i, x) if weighted else problem.grad(i, x)
            c[i] = topk_ref(target - g_i[i], k)
            g_i[i] = g_i[i] + c[i]
        g = g + sum(np.float32(w[i]) * c[i] for i in sampled)
        x = x - np.float32(gamma) * g
        ref_x.append(x.copy())
        ref_g.append(g.copy())

    xs, gs, clients = run_ef21_lib(problem.grad, x0, TopK(count=k), gamma, sched, w if weighted else None)
    assert len(xs) == rounds + 1 >= 11
    for t in range(rounds + 1):
        np.testing.assert_allclose(xs[t], ref_x[t], rtol=RTOL, atol=1e-7)
        np.testing.assert_allclose(gs[t], ref_g[t], rtol=RTOL, atol=1e-7)
    for i in range(N):
        np.testing.assert_allclose(clients[i].g, g_i[i], rtol=RTOL, atol=1e-7)
    # invariant: the server g equals sum_i w_i g_i at all times (EF21-PP divides by total n)
    np.testing.assert_allclose(gs[-1], sum(w[i] * clients[i].g for i in range(N)), rtol=1e-5, atol=1e-6)


def test_ef21_sgdm_matches_direct_transcription() -> None:
    problem = Logistic()
    rounds, k, eta, gamma = 12, 2, 0.3, 0.05
    sched = schedule(rounds, seed=9)

    def make_noisy() -> Grad:
        """Stochastic oracle: the j-th call of client i adds the noise draw seeded by (i, j)."""
        calls = [0] * N

        def noisy(i: int, x: np.ndarray) -> np.ndarray:
            noise = np.random.default_rng([i, calls[i]]).standard_normal(x.size)
            calls[i] += 1
            return (problem.grad(i, x) + 0.01 * noise).astype(np.float32)

        return noisy

    noisy = make_noisy()

    x0 = np.zeros(problem.d, np.float32)
    # direct transcription: v_i = g_i = grad_i(x0); then v_i = (1-eta) v_i + eta grad_i(x);
    # c_i = TopK(v_i - g_i); g_i += c_i; g += (1/n) sum_S c_i; x -= gamma g
    x = x0.copy()
    v = [noisy(i, x) for i in range(N)]
    g_i = [vi.copy() for vi in v]
    g = np.zeros(problem.d, np.float32)
    for i in range(N):
        g = g + np.float32(1.0 / N) * g_i[i]
    x = x - np.float32(gamma) * g
    ref_x = [x.copy()]
    for sampled in sched:
        cs = []
        for i in sampled:
            v[i] = np.float32(1 - eta) * v[i] + np.float32(eta) * noisy(i, x)
            c = topk_ref(v[i] - g_i[i], k)
            g_i[i] = g_i[i] + c
            cs.append(np.float32(1.0 / N) * c)
        g = g + sum(cs)
        x = x - np.float32(gamma) * g
        ref_x.append(x.copy())

    xs, _, clients = run_ef21_lib(make_noisy(), x0, TopK(count=k), gamma, sched, sgdm_eta=eta)
    for t in range(rounds + 1):
        np.testing.assert_allclose(xs[t], ref_x[t], rtol=RTOL, atol=1e-7)
    for i in range(N):
        assert clients[i].v is not None
        np.testing.assert_allclose(clients[i].v, v[i], rtol=RTOL, atol=1e-7)
        np.testing.assert_allclose(clients[i].g, g_i[i], rtol=RTOL, atol=1e-7)


def test_ef21_topk_converges_on_quadratic() -> None:
    problem = Quadratic()
    k = 3
    delta = k / problem.d
    theta = 1 - np.sqrt(1 - delta)
    beta = (1 - delta) / theta
    L_mean = np.linalg.eigvalsh(np.mean(problem.A, axis=0)).max()
    L_qm = np.sqrt(np.mean(problem.L**2))
    gamma = 1.0 / (L_mean + L_qm * np.sqrt(beta / theta))  # EF21 theoretical step size
    x0 = np.zeros(problem.d, np.float32)
    xs, _, _ = run_ef21_lib(problem.grad, x0, TopK(count=k), gamma, [list(range(N))] * 600)
    g0 = np.linalg.norm(problem.full_grad(x0))
    g_end = np.linalg.norm(problem.full_grad(xs[-1]))
    assert g_end < 1e-4 * g0, (g0, g_end)

    # partial participation also converges (slower)
    xs_pp, _, _ = run_ef21_lib(problem.grad, x0, TopK(count=k), gamma, schedule(1500, seed=4))
    assert np.linalg.norm(problem.full_grad(xs_pp[-1])) < 1e-3 * g0


def test_plain_compressed_baseline_does_not_reach_the_optimum() -> None:
    """Plain Top-K without error feedback stalls on the heterogeneous quadratic (sanity contrast)."""
    problem = Quadratic()
    x = np.zeros(problem.d, np.float32)
    g0 = np.linalg.norm(problem.full_grad(x))
    comp = TopK(count=3)
    for _ in range(600):
        msgs = {i: compressed_client_step(problem.grad(i, x), comp).decoded for i in range(N)}
        x = model_step(x, compressed_server_mean(msgs), 0.02)
    assert np.linalg.norm(problem.full_grad(x)) > 1e-3 * g0


# ------------------------------------------------------------------------------ EControl replay


@pytest.mark.parametrize("problem", [Quadratic(), Logistic()], ids=["quadratic", "logistic"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_econtrol_matches_direct_transcription(problem: Quadratic | Logistic, partial: bool) -> None:
    rounds, k, eta, gamma = 15, 3, 0.05, 0.02
    sched = schedule(rounds, seed=21) if partial else [list(range(N))] * rounds
    x0 = np.random.default_rng(6).standard_normal(problem.d).astype(np.float32)

    # direct transcription: e_i = 0, h_i = g_i(x0), h = mean h_i; each round
    # x <- x - gamma h; for i in S: D_i = TopK(eta e_i + g_i - h_i);
    # e_i <- e_i + g_i - h_i - D_i (old h_i); h_i <- h_i + D_i; h += (1/n) sum_S D_i
    x = x0.copy()
    e = [np.zeros(problem.d, np.float32) for _ in range(N)]
    h_i = [problem.grad(i, x) for i in range(N)]
    h = np.zeros(problem.d, np.float32)
    for i in range(N):
        h = h + np.float32(1.0 / N) * h_i[i]
    x = x - np.float32(gamma) * h
    ref_x, ref_h = [x.copy()], [h.copy()]
    for sampled in sched:
        D = {}
        for i in sampled:
            gi = problem.grad(i, x)
            D[i] = topk_ref(np.float32(eta) * e[i] + gi - h_i[i], k)
            e[i] = e[i] + gi - h_i[i] - D[i]
            h_i[i] = h_i[i] + D[i]
        h = h + sum(np.float32(1.0 / N) * D[i] for i in sampled)
        x = x - np.float32(gamma) * h
        ref_x.append(x.copy())
        ref_h.append(h.copy())

    xs, hs, clients = run_econtrol_lib(problem.grad, x0, TopK(count=k), gamma, eta, sched)
    assert len(xs) == rounds + 1 >= 11
    for t in range(rounds + 1):
        np.testing.assert_allclose(xs[t], ref_x[t], rtol=RTOL, atol=1e-7)
        np.testing.assert_allclose(hs[t], ref_h[t], rtol=RTOL, atol=1e-7)
    for i in range(N):
        np.testing.assert_allclose(clients[i].e, e[i], rtol=RTOL, atol=1e-7)
        np.testing.assert_allclose(clients[i].h, h_i[i], rtol=RTOL, atol=1e-7)
    # invariant: server h = mean_i h_i
    np.testing.assert_allclose(hs[-1], np.mean([c.h for c in clients], axis=0), rtol=1e-5, atol=1e-6)


def test_econtrol_error_is_the_dropped_part() -> None:
    """e+ = (1 - eta) e + (p - C(p)) with p the compressed vector (our reading of the EControl paper)."""
    rng = np.random.default_rng(0)
    d, eta = 40, 0.2
    st = EControlClientState(rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32))
    g = rng.standard_normal(d).astype(np.float32)
    comp = TopK(count=5)
    msg, new = econtrol_client_step(st, g, comp, eta)
    p = np.float32(eta) * st.e + g - st.h
    np.testing.assert_allclose(msg.decoded, topk_ref(p, 5), rtol=1e-7)
    np.testing.assert_allclose(new.e, (1 - eta) * st.e + (p - msg.decoded), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.h, st.h + msg.decoded, rtol=1e-7)
    assert msg.nbytes == 5 * (4 + 1)  # uint8 indices for d = 40


@pytest.mark.parametrize("comp", [TopK(count=3), RandK(count=4), ScaledSign()], ids=["topk", "randk", "sign"])
@pytest.mark.parametrize("problem", [Quadratic(), Logistic()], ids=["quadratic", "logistic"])
def test_econtrol_eta0_equals_ef21(comp: Compressor, problem: Quadratic | Logistic) -> None:
    """EControl with eta = 0 and h_i = C(g_i) at start reproduces EF21 started at g_i = C(u_i)."""
    rounds, gamma = 20, 0.02
    sched = schedule(rounds, seed=3)
    x0 = np.random.default_rng(2).standard_normal(problem.d).astype(np.float32)

    # EF21 with compressed start, via the library
    x = x0.copy()
    srv = EF21ServerState.zeros(problem.d)
    cl: list[EF21ClientState] = []
    msgs = {}
    for i in range(N):
        m, st = ef21_init_client(problem.grad(i, x), comp, np.random.default_rng([99, i]))
        cl.append(st)
        msgs[i] = m.decoded
    srv = ef21_server_step(srv, msgs, N)
    x = model_step(x, srv.g, gamma)
    ef_x = [x.copy()]
    for t, sampled in enumerate(sched):
        msgs = {}
        for i in sampled:
            m, cl[i] = ef21_client_step(cl[i], problem.grad(i, x), comp, np.random.default_rng([t, i]))
            msgs[i] = m.decoded
        srv = ef21_server_step(srv, msgs, N)
        x = model_step(x, srv.g, gamma)
        ef_x.append(x.copy())

    ec_x, ec_h, ec_cl = run_econtrol_lib(problem.grad, x0, comp, gamma, 0.0, sched, init_compressor=comp)
    for t in range(rounds + 1):
        np.testing.assert_array_equal(ec_x[t], ef_x[t])
    np.testing.assert_array_equal(ec_h[-1], srv.g)
    for i in range(N):
        np.testing.assert_array_equal(ec_cl[i].h, cl[i].g)


# ------------------------------------------------------------------------------ small units


def test_ef21_client_and_server_step_units() -> None:
    rng = np.random.default_rng(0)
    d = 30
    g = rng.standard_normal(d).astype(np.float32)
    u = rng.standard_normal(d).astype(np.float32)
    comp = TopK(count=4)
    msg, new = ef21_client_step(EF21ClientState(g.copy()), u, comp)
    np.testing.assert_array_equal(msg.decoded, topk_ref(u - g, 4))
    np.testing.assert_array_equal(new.g, g + msg.decoded)
    assert set(msg.payload) == {"values", "indices"} and msg.nbytes == 4 * 5

    # server divides by the TOTAL n under partial participation
    srv = ef21_server_step(EF21ServerState(np.ones(d, np.float32)), {1: np.ones(d, np.float32) * 10}, n=5)
    np.testing.assert_allclose(srv.g, np.full(d, 3.0))
    # no messages -> unchanged
    np.testing.assert_array_equal(ef21_server_step(srv, {}, n=5).g, srv.g)
    with pytest.raises(ValueError):
        ef21_server_step(srv, {7: np.zeros(d, np.float32)}, n=5)


def test_ef21_weights_and_scale() -> None:
    w = ef21_weights([1.0, 3.0])
    np.testing.assert_allclose(w, [0.25, 0.75])
    assert ef21_client_scale(w, 0) == pytest.approx(2.0)
    assert ef21_client_scale(w, 1) == pytest.approx(2.0 / 3.0)
    np.testing.assert_allclose(ef21_weights(None, 4), np.full(4, 0.25))
    with pytest.raises(ValueError):
        ef21_weights([1.0, -1.0])
    with pytest.raises(ValueError):
        ef21_weights(None)


def test_weighted_ef21_uniform_weights_is_plain_ef21() -> None:
    problem = Quadratic()
    sched = schedule(12, seed=8)
    x0 = np.zeros(problem.d, np.float32)
    xs_plain, _, _ = run_ef21_lib(problem.grad, x0, TopK(count=3), 0.02, sched)
    xs_w, _, _ = run_ef21_lib(problem.grad, x0, TopK(count=3), 0.02, sched, np.full(N, 1.0 / N))
    np.testing.assert_allclose(xs_w[-1], xs_plain[-1], rtol=1e-5, atol=1e-6)


def test_econtrol_init_and_identity() -> None:
    g = np.arange(6, dtype=np.float32)
    msg, st = econtrol_init_client(g)
    np.testing.assert_array_equal(st.h, g)
    np.testing.assert_array_equal(st.e, np.zeros(6, np.float32))
    assert msg.nbytes == 24
    # with the identity compressor EControl sends exactly g - h and e stays 0 when eta = 0
    msg2, st2 = econtrol_client_step(st, g + 1, Identity(), eta=0.0)
    np.testing.assert_array_equal(msg2.decoded, np.ones(6, np.float32))
    np.testing.assert_array_equal(st2.e, np.zeros(6, np.float32))
    with pytest.raises(ValueError):
        econtrol_client_step(st, g, Identity(), eta=-1.0)


def test_state_roundtrips(tmp_path: object) -> None:
    rng = np.random.default_rng(0)
    d = 17
    states = [
        EF21ClientState(rng.standard_normal(d).astype(np.float32)),
        EF21ClientState(rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)),
        EF21ServerState(rng.standard_normal(d).astype(np.float32)),
        EControlClientState(rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)),
        EControlServerState(rng.standard_normal(d).astype(np.float32)),
    ]
    st_numpy = pytest.importorskip("safetensors.numpy")
    import pathlib

    for j, st in enumerate(states):
        arrays = st.to_arrays()
        back = type(st).from_arrays(arrays)
        for key, arr in arrays.items():
            np.testing.assert_array_equal(getattr(back, key), arr)
        path = pathlib.Path(str(tmp_path)) / f"state{j}.safetensors"
        st_numpy.save_file(arrays, str(path))
        loaded = type(st).from_arrays(st_numpy.load_file(str(path)))
        for key, arr in arrays.items():
            np.testing.assert_array_equal(getattr(loaded, key), arr)
    with pytest.raises(ValueError, match="missing"):
        EControlClientState.from_arrays({"e": np.zeros(3, np.float32)})
    with pytest.raises(ValueError):
        ef21_sgdm_client_step(EF21ClientState.zeros(3), np.zeros(3, np.float32), TopK(count=1), 0.5)


def test_steps_do_not_mutate_inputs() -> None:
    rng = np.random.default_rng(0)
    st = EControlClientState(rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32))
    before = st.to_arrays()
    econtrol_client_step(st, rng.standard_normal(8).astype(np.float32), TopK(count=2), 0.1)
    np.testing.assert_array_equal(st.e, before["e"])
    np.testing.assert_array_equal(st.h, before["h"])
    ef = EF21ClientState(rng.standard_normal(8).astype(np.float32), np.zeros(8, np.float32))
    g_before = ef.g.copy()
    ef21_sgdm_client_step(ef, np.ones(8, np.float32), TopK(count=2), 0.5)
    np.testing.assert_array_equal(ef.g, g_before)
    np.testing.assert_array_equal(ef.v, np.zeros(8, np.float32))

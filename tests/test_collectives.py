"""Every op x dtype x reduce op x size x world size, disttrain against gloo and
against a reference computed locally from every rank's (deterministic) input.
One job per world size runs the whole matrix, so the suite stays fast."""

import time

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks, transport_env

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int32, torch.int64,
          torch.uint8]
REDUCE_OPS = ["SUM", "AVG", "MIN", "MAX", "PRODUCT"]
# Bytes per rank for the largest case: 16 times every size threshold of the transports (1 MiB
# shared-memory slots and TCP frames; the algorithm switches are at 128 KiB and below), so it runs
# many slots, segments and frames and a ragged tail. It was 64 MiB, which covered no other path and
# made the 3-rank TCP and 2-rank shared-memory jobs 37 and 18 s of the suite (2 Dec 2026).
BIG = 16 << 20
# The largest case exercises chunking, slots and segment boundaries, which depend on the element
# size only: one dtype per element size runs it (every dtype runs the other sizes).
BIG_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.uint8)


def counts_for(dtype):
    elem = torch.tensor([], dtype=dtype).element_size()
    return [0, 1, 1001, BIG // elem]


PERIOD = 5


def pattern(rank, dtype, salt=0):
    """The repeating unit of a rank's input: small integers, so that every
    reduction is exact in every dtype and in any order."""
    base = (torch.arange(PERIOD, dtype=torch.int64) * (rank + 3) + rank * 5 + salt) % PERIOD
    return (base + 1).to(dtype) if dtype == torch.uint8 else (base - 2).to(dtype)


def tile(unit, n):
    return unit.repeat((n + PERIOD - 1) // PERIOD)[:n].clone()


def make_input(rank, n, dtype, salt=0):
    return tile(pattern(rank, dtype, salt), n)


def reference(units, op, world, n):
    """Reduces the ranks' repeating units and tiles the result to n elements."""
    stacked = torch.stack([u.to(torch.float64) for u in units])
    if op in ("SUM", "AVG"):
        out = stacked.sum(0)
    elif op == "MIN":
        out = stacked.min(0).values
    elif op == "MAX":
        out = stacked.max(0).values
    else:
        out = stacked.prod(0)
    dtype = units[0].dtype
    if op == "AVG":
        if dtype.is_floating_point:  # the exact sum, divided in the tensor's own dtype
            return tile(out.to(dtype), n) / world
        out = torch.div(out, world, rounding_mode="trunc")
    if dtype == torch.uint8:
        out = out.to(torch.int64).remainder(256)  # wraps around like the hardware
    return tile(out.to(dtype), n)


def gloo_supports(dtype, op):
    return op != "AVG"


def _run_matrix(rank, world, big, transport):
    gloo = dist.new_group(backend="gloo")
    failures = []
    used = dist.group.WORLD._get_backend(torch.device("cpu")).transport
    transport = {"mixed": "shm+tcp"}.get(transport, transport)
    if world > 1 and used != transport:
        failures.append(f"transport {used} in use, {transport} requested")

    def expect(name, got, want):
        if not torch.equal(got, want):
            diff = (got.to(torch.float64) - want.to(torch.float64)).abs()
            failures.append(f"{name}: mismatch (max abs diff {diff.max().item() if diff.numel() else 0})")

    for dtype in DTYPES:
        for n in counts_for(dtype):
            if n * torch.tensor([], dtype=dtype).element_size() >= BIG and (not big or dtype not in BIG_DTYPES):
                continue
            tag = f"{dtype} n={n}"
            units = [pattern(r, dtype) for r in range(world)]
            mine = make_input(rank, n, dtype)
            # all_reduce, every op
            for op in REDUCE_OPS:
                t = mine.clone()
                dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
                want = reference(units, op, world, n)
                expect(f"all_reduce {op} {tag}", t, want)
                if gloo_supports(dtype, op):
                    g = mine.clone()
                    dist.all_reduce(g, op=getattr(dist.ReduceOp, op), group=gloo)
                    expect(f"all_reduce {op} {tag} vs gloo", t, g)
            # broadcast from the last rank
            t = mine.clone()
            dist.broadcast(t, src=world - 1)
            expect(f"broadcast {tag}", t, make_input(world - 1, n, dtype))
            # all_gather (list) and all_gather_into_tensor
            outs = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(outs, mine)
            for r in range(world):
                expect(f"all_gather[{r}] {tag}", outs[r], make_input(r, n, dtype))
            flat = torch.empty(n * world, dtype=dtype)
            dist.all_gather_into_tensor(flat, mine)
            expect(f"all_gather_into_tensor {tag}", flat, torch.cat([make_input(r, n, dtype) for r in range(world)]))
            g = torch.empty_like(flat)
            dist.all_gather_into_tensor(g, mine, group=gloo)
            expect(f"all_gather_into_tensor {tag} vs gloo", flat, g)
            # reduce_scatter: each rank contributes world blocks of n // world elements
            per = n // world
            blocks = [make_input(rank, per, dtype, salt=b) for b in range(world)]
            units_for_mine = [pattern(r, dtype, salt=rank) for r in range(world)]
            out = torch.empty(per, dtype=dtype)
            dist.reduce_scatter(out, blocks)
            expect(f"reduce_scatter {tag}", out, reference(units_for_mine, "SUM", world, per))
            out2 = torch.empty(per, dtype=dtype)
            dist.reduce_scatter_tensor(out2, torch.cat(blocks), op=dist.ReduceOp.MAX)
            expect(f"reduce_scatter_tensor MAX {tag}", out2,
                   reference(units_for_mine, "MAX", world, per))
            g = torch.empty(per, dtype=dtype)
            dist.reduce_scatter_tensor(g, torch.cat(blocks), op=dist.ReduceOp.MAX, group=gloo)
            expect(f"reduce_scatter_tensor MAX {tag} vs gloo", out2, g)
            # all_to_all_single, even split, and all_to_all with uneven per-peer sizes
            send = torch.cat([make_input(rank, per, dtype, salt=d) for d in range(world)])
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send)
            expect(f"all_to_all_single {tag}", recv, torch.cat([make_input(s, per, dtype, salt=rank)
                                                                for s in range(world)]))
            sizes = lambda src, dst: (src + 2 * dst) % 3 + (per if n < 100 else 7)  # noqa: E731
            ins = [make_input(rank, sizes(rank, d), dtype, salt=d) for d in range(world)]
            outs = [torch.empty(sizes(s, rank), dtype=dtype) for s in range(world)]
            dist.all_to_all(outs, ins)
            for s in range(world):
                expect(f"all_to_all[{s}] {tag}", outs[s], make_input(s, sizes(s, rank), dtype, salt=rank))
            # point to point around a ring, both directions posted before waiting
            if world > 1:
                right, left = (rank + 1) % world, (rank - 1) % world
                got = torch.empty_like(mine)
                reqs = [dist.isend(mine, right), dist.irecv(got, left)]
                for q in reqs:
                    q.wait()
                expect(f"send/recv {tag}", got, make_input(left, n, dtype))
            dist.barrier()
    # Non-contiguous tensors and the coalesced path.
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) * (rank + 1)
    view = base.t()
    dist.all_reduce(view)
    expect("all_reduce non-contiguous", base, torch.arange(12, dtype=torch.float32).reshape(3, 4)
           * sum(range(1, world + 1)))
    ts = [torch.full((3,), float(rank)), torch.full((5,), float(rank + 1))]
    dist.all_reduce_coalesced(ts)
    expect("all_reduce_coalesced[0]", ts[0], torch.full((3,), float(sum(range(world)))))
    expect("all_reduce_coalesced[1]", ts[1], torch.full((5,), float(sum(range(1, world + 1)))))
    # Coalesced in place (shared memory: no flattened copy) equals the flat
    # all-reduce bit for bit: across a slot boundary, with an empty tensor, AVG
    # fused (f32, f64) or not (bf16); rank 0 passes a non-contiguous tensor.
    for dtype, op in ((torch.float32, dist.ReduceOp.AVG), (torch.float64, dist.ReduceOp.AVG),
                      (torch.bfloat16, dist.ReduceOp.AVG), (torch.int32, dist.ReduceOp.SUM)):
        g = torch.Generator().manual_seed(rank)
        ts = [(torch.randn(n, generator=g) * 100).to(dtype) for n in (5, 0, (1 << 18) + 3, 70_000, 1)]
        flat = torch.cat(ts)
        dist.all_reduce(flat, op=op)
        if rank == 0:
            ts[2] = torch.stack([ts[2], ts[2]], 1)[:, 0]
        dist.all_reduce_coalesced(ts, op=op)
        expect(f"all_reduce_coalesced {dtype} {op}", torch.cat(ts), flat)
    # reduce / gather / scatter with a non-zero root
    root = world // 2
    t = torch.full((4,), float(rank + 1))
    dist.reduce(t, dst=root)
    if rank == root:
        expect("reduce", t, torch.full((4,), float(sum(range(1, world + 1)))))
    else:
        expect("reduce leaves non-root input alone", t, torch.full((4,), float(rank + 1)))
    gathered = [torch.empty(2) for _ in range(world)] if rank == root else None
    dist.gather(torch.full((2,), float(rank)), gathered, dst=root)
    if rank == root:
        for r in range(world):
            expect(f"gather[{r}]", gathered[r], torch.full((2,), float(r)))
    out = torch.empty(2)
    dist.scatter(out, [torch.full((2,), float(r)) for r in range(world)] if rank == root else None, src=root)
    expect("scatter", out, torch.full((2,), float(rank)))
    # Synchronous small all-reduces ran on the caller's thread over shared
    # memory only (TCP and two-level groups keep the progress thread).
    caller_ops = dist.group.WORLD._get_backend(torch.device("cpu")).caller_thread_ops
    if world > 1 and (caller_ops > 0) != (transport == "shm"):
        failures.append(f"{caller_ops} all-reduces on the caller's thread over {transport}")
    return failures


@pytest.mark.parametrize("world,transport", [(w, t) for t in ("shm", "tcp") for w in (1, 2, 3, 4)]
                         + [(3, "mixed"), (4, "mixed")])
def test_matrix_matches_gloo(world, transport):
    # The BIG cases run once per transport (shm at 2 ranks, tcp at 3, the odd
    # ring); every other size runs everywhere. The full BIG matrix at every
    # world size takes too long for the suite on a 2-core machine.
    big = (transport, world) in (("shm", 2), ("tcp", 3))
    results = run_ranks(_run_matrix, world, args=(big, transport), timeout=900, pg_timeout=300,
                        **transport_env(transport))
    failures = [f"rank {r}: {f}" for r, fs in enumerate(results) for f in fs]
    assert not failures, "\n".join(failures[:40])


def _forced_algorithms(rank, world):
    failures = []
    for n in [0, 1, 3, 1000, 300_001]:
        t = torch.full((n,), float(rank + 1))
        dist.all_reduce(t)
        if not torch.equal(t, torch.full((n,), float(sum(range(1, world + 1))))):
            failures.append(f"n={n}")
    # The group runs on TCP with the forced settings in effect (an ignored
    # setting, or a group on shared memory, would pass the sums above too).
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    options = {name: value for name, value, _, _ in backend.options}
    return failures, backend.transport, options["allreduce_algorithm"], options["chunk_bytes"]


@pytest.mark.parametrize("algo", ["ring", "rd"])
def test_each_allreduce_algorithm_at_every_size(algo):
    # Over TCP: the algorithm option applies to the TCP paths only (shared memory has one algorithm).
    results = run_ranks(_forced_algorithms, 3, env={"DISTTRAIN_ALLREDUCE_ALGO": algo, "DISTTRAIN_CHUNK_BYTES": "4096",
                                                     "DISTTRAIN_TRANSPORT": "tcp"})
    assert results == [([], "tcp", algo, "4096")] * 3


def _avg_edge_values(rank, world):
    # Subnormals, values that become subnormal when halved, the largest finite
    # values and ordinary ones: the fused AVG (a multiply by 1/world for a
    # power of two, a divide otherwise) must give SUM's result / world bit for bit.
    out = {}
    for dtype in (torch.float32, torch.float64):
        info = torch.finfo(dtype)
        g = torch.Generator().manual_seed(rank)
        special = torch.tensor([info.tiny, info.tiny / 3, info.tiny * 1.5, info.max / world, -info.max / world,
                                info.eps, 0.0, -0.0, 1.0 / 3], dtype=dtype)
        t = torch.cat([special * (rank + 1), torch.randn(100_003, generator=g, dtype=dtype)])
        mine = t.clone()
        dist.all_reduce(mine, op=dist.ReduceOp.AVG)
        total = t.clone()
        dist.all_reduce(total)  # the same sum (the same order of additions), then torch's divide
        expected = total / world
        out[str(dtype)] = bool(torch.equal(mine.view(torch.int64 if dtype == torch.float64 else torch.int32),
                                           expected.view(torch.int64 if dtype == torch.float64 else torch.int32)))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_avg_is_sum_divided_bit_for_bit(world):
    for result in run_ranks(_avg_edge_values, world_size=world):
        assert all(result.values()), result


# The caller-thread path: a synchronous all-reduce over shared memory that fits
# one slot runs on the calling thread (no hand-off to the progress thread);
# async_op=True, or an async op still in flight, keeps the queued path.
CALLER_COUNTS = [0, 1, 7, 1001, 20_000]  # 20_000 elements: past 32 KiB (the two-phase reduction) for 2+ byte dtypes


def _bits(t):
    """The tensor's bytes as integers, so that equal means bit-identical (NaN, -0.0)."""
    return t.view(torch.uint8) if t.numel() else t


def _caller_thread_matches_queued(rank, world):
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    failures = []
    sync_ops = 0
    before = backend.caller_thread_ops
    g = torch.Generator().manual_seed(1234 + rank)
    for dtype in DTYPES:
        for n in CALLER_COUNTS:
            if dtype.is_floating_point:
                # Values whose sums depend on the order of additions: any
                # difference in how the two paths combine them shows up in the bits.
                x = (torch.randn(n, generator=g, dtype=torch.float64) * 100).to(dtype)
            else:
                x = make_input(rank, n, dtype)
            for op in REDUCE_OPS:
                red = getattr(dist.ReduceOp, op)
                fast = x.clone()
                dist.all_reduce(fast, op=red)
                sync_ops += 1
                queued = x.clone()
                dist.all_reduce(queued, op=red, async_op=True).wait()
                if not torch.equal(_bits(fast), _bits(queued)):
                    failures.append(f"{op} {dtype} n={n}: caller thread and progress thread differ")
    if backend.caller_thread_ops - before != sync_ops:
        failures.append(f"{backend.caller_thread_ops - before} of {sync_ops} synchronous all-reduces ran on the "
                        "caller's thread")
    # Non-contiguous input: staged, reduced on the caller's thread, copied back.
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) * (rank + 1)
    dist.all_reduce(base.t())
    if not torch.equal(base, torch.arange(12, dtype=torch.float32).reshape(3, 4) * sum(range(1, world + 1))):
        failures.append("non-contiguous all_reduce on the caller's thread")
    # Async ops in flight: a synchronous all-reduce issued behind them queues
    # behind them (issue order; otherwise the ranks would disagree on the
    # sequence numbers and raise a mismatch), and every result is right.
    for round_ in range(3):
        pending = [(t, dist.all_reduce(t, async_op=True))
                   for t in (torch.full((300_000,), float(rank + 1)), torch.full((5,), float(rank + round_)))]
        small = torch.full((3,), float(rank))
        dist.all_reduce(small)
        for t, w in pending:
            w.wait()
        expect_big = float(sum(range(1, world + 1)))
        expect_small5 = float(sum(range(world))) + world * round_
        if not (torch.equal(pending[0][0], torch.full((300_000,), expect_big))
                and torch.equal(pending[1][0], torch.full((5,), expect_small5))
                and torch.equal(small, torch.full((3,), float(sum(range(world)))))):
            failures.append(f"in-flight round {round_}: wrong results")
    # Deterministically in flight: rank 0's async all-reduce cannot finish
    # before the last rank joins it, so rank 0's synchronous one must queue.
    before = backend.caller_thread_ops
    if rank == world - 1:
        time.sleep(0.3)
    big = torch.ones(1000)
    w = dist.all_reduce(big, async_op=True)
    small = torch.ones(2)
    dist.all_reduce(small)
    w.wait()
    if rank == 0 and backend.caller_thread_ops != before:
        failures.append("a synchronous all-reduce ran on the caller's thread while an async one was in flight")
    if not (torch.equal(big, torch.full((1000,), float(world))) and torch.equal(small, torch.full((2,), float(world)))):
        failures.append("wrong results behind a pending async op")
    # A Work completed on the caller's thread still has a future (made on request).
    opts = dist.AllreduceOptions()
    opts.asyncOp = False
    t = torch.full((4,), float(rank))
    before = backend.caller_thread_ops
    work = backend.allreduce([t], opts)
    value = work.get_future().wait()
    if backend.caller_thread_ops != before + 1 or not work.is_completed():
        failures.append("backend.allreduce with asyncOp=False did not complete on the caller's thread")
    if not (torch.equal(value[0], torch.full((4,), float(sum(range(world))))) and value[0] is t
            and work.result()[0] is t):
        failures.append(f"the caller-thread Work's future holds {value}")
    # Larger than one slot: the progress thread, as before.
    before = backend.caller_thread_ops
    dist.all_reduce(torch.ones((4 << 20) // 4 + 1))  # above the largest default slot (4 MiB when ranks outnumber cores)
    if backend.caller_thread_ops != before:
        failures.append("an all-reduce larger than one slot ran on the caller's thread")
    return failures


@pytest.mark.parametrize("world", [2, 3])
def test_caller_thread_all_reduce_matches_the_queued_path(world):
    results = run_ranks(_caller_thread_matches_queued, world, **transport_env("shm"))
    failures = [f"rank {r}: {f}" for r, fs in enumerate(results) for f in fs]
    assert not failures, "\n".join(failures[:40])



def _overlapping_outputs_and_bool_xor(rank, world):
    """An output tensor whose elements share memory is refused in the caller's thread
    with a ValueError, and the group goes on; a broadcast root may send from one."""
    out = {}

    def refused(name, fn):
        try:
            fn()
        except ValueError as e:
            out[name] = "share memory" in str(e)
        else:
            out[name] = False

    shared = lambda: torch.tensor([float(rank + 1)]).expand(4)  # noqa: E731
    refused("all_reduce", lambda: dist.all_reduce(shared()))
    refused("all_reduce async", lambda: dist.all_reduce(shared(), async_op=True).wait())
    refused("all_gather_into_tensor", lambda: dist.all_gather_into_tensor(
        torch.zeros(1).expand(4 * world), torch.ones(4)))
    refused("recv", lambda: dist.recv(torch.zeros(1).expand(3), (rank + 1) % world))
    t = torch.ones(3)
    dist.all_reduce(t)  # the group still works
    out["after"] = torch.equal(t, torch.full((3,), float(world)))
    src = torch.tensor([7.0]).expand(4) if rank == 0 else torch.zeros(4)
    dist.broadcast(src, 0)
    out["broadcast from a shared-memory root"] = torch.equal(src, torch.full((4,), 7.0))
    gloo = dist.new_group(backend="gloo")
    for n in (0, 5, 100_003):
        b = (torch.arange(n) % (rank + 2) == 0)
        mine, ref = b.clone(), b.clone()
        dist.all_reduce(mine, op=dist.ReduceOp.BXOR)
        dist.all_reduce(ref, op=dist.ReduceOp.BXOR, group=gloo)
        out[f"bool BXOR n={n}"] = torch.equal(mine, ref)
    return out


@pytest.mark.parametrize("world,transport", [(2, "shm"), (3, "tcp")])
def test_overlapping_output_is_refused_and_bool_bxor(world, transport):
    for result in run_ranks(_overlapping_outputs_and_bool_xor, world, **transport_env(transport)):
        assert all(result.values()), result


def _nan_min_max(rank, world):
    """MIN/MAX with a NaN on one rank: NaN on every rank (torch.maximum's rule), at every
    size (each algorithm: recursive doubling with a fold at 3 ranks, ring, two-phase shm)."""
    bad = []
    for n in (6, 20_000, 400_000):
        for op in ("MAX", "MIN"):
            for who in range(world):
                for dtype in (torch.float32, torch.float64, torch.bfloat16):
                    t = (torch.arange(n) % 7).to(dtype)
                    if rank == who:
                        t[3] = float("nan")
                        t[n - 1] = float("nan")
                    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
                    if not (t[3].isnan() and t[n - 1].isnan() and not t[:3].isnan().any()):
                        bad.append((n, op, who, str(dtype), t[3].item(), t[n - 1].item()))
    return bad


@pytest.mark.parametrize("world,transport", [(2, "shm"), (3, "shm"), (3, "tcp")])
def test_min_max_propagate_nan_on_every_rank(world, transport):
    results = run_ranks(_nan_min_max, world, **transport_env(transport))
    assert not any(results), results


def _all_to_all_single_in_place(rank, world):
    """all_to_all_single(t, t): every rank's blocks arrive, none overwritten before it was sent."""
    bad = []
    for n in (5, 70_000):
        t = torch.arange(n * world, dtype=torch.float32) + 10_000 * rank
        dist.all_to_all_single(t, t)
        want = torch.cat([torch.arange(n * world, dtype=torch.float32)[rank * n:(rank + 1) * n] + 10_000 * s
                          for s in range(world)])
        if not torch.equal(t, want):
            bad.append(f"n={n}")
    return bad


@pytest.mark.parametrize("world,transport", [(2, "shm"), (3, "tcp")])
def test_all_to_all_single_in_place(world, transport):
    results = run_ranks(_all_to_all_single_in_place, world, **transport_env(transport))
    assert not any(results), results


def _inference_tensors(rank, world):
    """Collectives on tensors made under torch.inference_mode() (Lightning's metrics, sync_dist):
    the results gloo gives, not 'Inplace update to inference tensor outside InferenceMode'."""
    bad = []
    for n in (3, 70_000):
        for op in ("SUM", "AVG"):
            for dtype in (torch.float32, torch.int64):
                if op == "AVG" and dtype == torch.int64 and n > 3:
                    continue
                with torch.inference_mode():
                    t = torch.full((n,), rank + 1, dtype=dtype)
                    strided = torch.full((n, 2), rank + 1, dtype=torch.float32)[:, 0]  # copied back
                try:
                    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
                    dist.all_reduce(strided)
                except RuntimeError as e:
                    bad.append(f"{op} {dtype} n={n}: {e}")
                    continue
                total = world * (world + 1) // 2
                want = total / world if op == "AVG" else total
                if dtype == torch.int64 and op == "AVG":
                    want = total // world
                if not (torch.all(t == want) and torch.all(strided == total)):
                    bad.append(f"{op} {dtype} n={n}: {t[:3].tolist()} {strided[:3].tolist()}")
    with torch.inference_mode():
        out = torch.empty(world * 2)
        b = torch.full((2,), float(rank))
    dist.all_gather_into_tensor(out, torch.full((2,), float(rank)))
    dist.broadcast(b, 0)
    if not (torch.equal(out, torch.arange(world).repeat_interleave(2).float()) and torch.all(b == 0)):
        bad.append(f"all_gather/broadcast: {out.tolist()} {b.tolist()}")
    return bad


@pytest.mark.parametrize("world,transport", [(1, "tcp"), (2, "shm"), (3, "tcp")])
def test_inference_tensors(world, transport):
    results = run_ranks(_inference_tensors, world, **transport_env(transport))
    assert not any(results), results


def _complex_reductions(rank, world):
    """Complex tensors under SUM and AVG in reduce, reduce_scatter_tensor and reduce_scatter (which
    torch hands to the backend as complex, unlike all_reduce): the values gloo gives, the result in
    the tensor passed in (a transposed one included); other ops a ValueError, and the group goes on."""
    gloo = dist.new_group(backend="gloo")
    bad = []

    def data(n):
        k = torch.arange(n * world, dtype=torch.float64)
        return torch.complex(k + rank, (rank + 1) * k - 3).to(torch.complex64)

    for n in (3, 40_000):
        for op in ("SUM", "AVG"):
            rop = getattr(dist.ReduceOp, op)
            for name in ("reduce", "reduce_scatter_tensor", "reduce_scatter", "reduce transposed"):
                got, want = [], []
                for group, res in ((None, got), (gloo, want)):
                    if name == "reduce":
                        t = data(n)[:n].clone()
                        dist.reduce(t, world - 1, op=rop, group=group)
                    elif name == "reduce transposed":
                        t = data(n)[:n - n % 3].clone().reshape(3, -1).t()
                        dist.reduce(t, world - 1, op=rop, group=group)
                        t = t.contiguous()
                    elif name == "reduce_scatter_tensor":
                        t = torch.zeros(n, dtype=torch.complex64)
                        dist.reduce_scatter_tensor(t, data(n), op=rop, group=group)
                    else:
                        t = torch.zeros(n, dtype=torch.complex64)
                        dist.reduce_scatter(t, list(data(n).chunk(world)), op=rop, group=group)
                    res.append(t)
                if name in ("reduce", "reduce transposed") and rank != world - 1:
                    continue  # only the root's tensor holds the result
                if not torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-6):
                    bad.append(f"{name} {op} n={n}: {got[0][:3].tolist()} != gloo {want[0][:3].tolist()}")
    try:
        dist.reduce(torch.ones(2, dtype=torch.complex64), 0, op=dist.ReduceOp.MAX)
        bad.append("complex MAX reduce accepted")
    except ValueError:
        pass
    t = torch.ones(3)
    dist.all_reduce(t)
    if not torch.equal(t, torch.full((3,), float(world))):
        bad.append(f"after: {t.tolist()}")
    return bad


@pytest.mark.parametrize("world,transport", [(2, "shm"), (3, "tcp")])
def test_complex_sum_and_avg_in_reduce_and_reduce_scatter(world, transport):
    results = run_ranks(_complex_reductions, world, **transport_env(transport))
    assert not any(results), results


def _reduce_scatter_output_inside_the_input(rank, world):
    """reduce_scatter_tensor(out, inp) with out a view of inp: its own chunk (in place), another
    rank's chunk, a window across two chunks. The sum of the inputs as they were, whichever; an
    output elsewhere in the input was written while the input was still being sent (2 ranks, TCP:
    [7, 10] for [2, 4])."""
    bad = []
    for n in (2, 50_000):
        want = ((torch.arange(world * n, dtype=torch.float64) + 1) * world)[rank * n:(rank + 1) * n].float()
        for name, start in (("own chunk", rank * n), ("next rank's chunk", ((rank + 1) % world) * n),
                            ("across two chunks", (rank * n + n // 2) % ((world - 1) * n))):
            inp = torch.arange(world * n, dtype=torch.float32) + 1
            out = inp[start:start + n]
            dist.reduce_scatter_tensor(out, inp)
            if not torch.equal(out, want):
                bad.append(f"{name} n={n}: {out[:3].tolist()} != {want[:3].tolist()}")
    return bad


@pytest.mark.parametrize("world,transport", [(2, "tcp"), (2, "shm"), (3, "tcp")])
def test_reduce_scatter_into_a_view_of_its_input(world, transport):
    results = run_ranks(_reduce_scatter_output_inside_the_input, world, **transport_env(transport))
    assert not any(results), results


def _callback_issues_an_op_and_waits(rank, world):
    """A future's callback that issues another collective and waits for it (what
    PowerSGD's DDP hook does), nested twice (gloo, with its two worker threads,
    manages one level), then an ordinary op on the same group."""
    a = torch.full((4,), float(rank + 1))
    b = torch.full((3,), float(rank + 2))
    c = torch.full((2,), float(rank + 3))

    def second(fut):
        got = dist.all_reduce(c, async_op=True).get_future().wait()[0]
        return fut.value()[0].sum() + got.sum()

    def first(fut):
        inner = dist.all_reduce(b, async_op=True).get_future()
        return inner.then(second).wait() + fut.value()[0].sum()

    total = dist.all_reduce(a, async_op=True).get_future().then(first).wait()
    after = torch.ones(5)
    dist.all_reduce(after)
    return total.item(), after.sum().item()


@pytest.mark.parametrize("world,transport", [(2, "shm"), (3, "tcp")])
def test_future_callback_that_issues_an_op_and_waits(world, transport):
    results = run_ranks(_callback_issues_an_op_and_waits, world, timeout=90, pg_timeout=20,
                        **transport_env(transport))
    ranks_sum = lambda k: sum(r + k for r in range(world))  # noqa: E731
    want = 4 * ranks_sum(1) + 3 * ranks_sum(2) + 2 * ranks_sum(3)
    assert results == [(want, 5.0 * world)] * world, results

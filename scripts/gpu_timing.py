"""CUDA-graph timing shared by the device scripts (scripts/gpu_*.py).

    warm_up(fn, times)        run fn on a side stream (Triton / inductor compiles and lazy init stay out of
                              any capture that follows), then wait for it
    capture(fn, warm=1)       (graph, fn's output): fn warmed up, then captured in one CUDA graph
    replay_ms(g, replays)     median milliseconds of one replay (after a few untimed ones)
    graph_ms(fn, replays)     replay_ms(capture(fn)[0]): fn's time as one graph
"""
import statistics

import torch


def warm_up(fn, times: int = 1) -> None:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def capture(fn, warm: int = 1):
    warm_up(fn, warm)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def replay_ms(g: torch.cuda.CUDAGraph, replays: int = 20, untimed: int = 3) -> float:
    for _ in range(untimed):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_ms(fn, replays: int = 20, warm: int = 3) -> float:
    g, _ = capture(fn, warm)
    ms = replay_ms(g, replays)
    del g
    return ms

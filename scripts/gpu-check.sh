#!/usr/bin/env bash
# GPU readiness, on a CUDA machine, before the papers' grid spends GPU hours:
#   1. the tiny DAG (.test/config.yaml) end to end with `device: cuda` (`dtype: auto` = bfloat16 where supported),
#      and every activation store it wrote says it was computed on the GPU;
#   2. the torch statistics path on the GPU against the CPU fused kernels on the same shard (float32);
#   3. bf16 extraction tokens/s next to the bare bf16 forward over the same batches
#      (`python -m neuronatlas.bench extraction_gpu`, the GPU form of `bench extraction`).
# Usage (after `make setup`): bash scripts/gpu-check.sh [work folder]. Prints the benchmark's JSON; exits non-zero at
# the first failed step, and with 2 where no CUDA device is visible (nothing else is run then).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WORK=${1:-$(mktemp -d -t neuronatlas-gpu-check-XXXXXX)}
CORES=${CORES:-4}

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "- CUDA build:", torch.version.cuda or "none (a CPU-only wheel)")' >&2
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L >&2 || true; else echo "nvidia-smi: not found" >&2; fi
  echo "gpu-check: no CUDA device is visible to torch; run this on a GPU node with a CUDA build of torch" \
    "(envs/cuda.yaml installs one). Nothing was run." >&2
  exit 2
fi
"$PYTHON" -c 'import torch; print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")'

echo "gpu-check 1/3: the tiny DAG with device: cuda in $WORK"
"$PYTHON" - "$WORK" <<'EOF'
import sys
from pathlib import Path

import yaml

sys.path.insert(0, "tests")
import helpers

work = Path(sys.argv[1])
work.mkdir(parents=True, exist_ok=True)
(work / "tiny-cuda.yaml").write_text(yaml.safe_dump(helpers.tiny_config(work, device="cuda")))
EOF
"$PYTHON" -m snakemake -s Snakefile -d "$WORK" --configfile "$WORK/tiny-cuda.yaml" --cores "$CORES" --resources gpu=1 \
  > "$WORK/snakemake.log" 2>&1 || { tail -n 60 "$WORK/snakemake.log" >&2; echo "gpu-check: the tiny DAG failed on CUDA (log: $WORK/snakemake.log)" >&2; exit 1; }
"$PYTHON" - "$WORK/results" <<'EOF'
import sys
from pathlib import Path

import torch

from neuronatlas.core import store

results = Path(sys.argv[1])
want = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
stores = sorted(results.glob("*/*/*/activations/stats.h5"))
assert stores, f"no activation statistics under {results}"
wrong = []
for path in stores:
    with store.open_store(path) as s:
        device, dtype = s.attrs.get("device"), s.attrs.get("dtype")
    if not str(device).startswith("cuda") or dtype != want:
        wrong.append(f"{path.relative_to(results)}: device {device}, dtype {dtype}")
assert not wrong, "stores not computed on the GPU in " + want + ":\n" + "\n".join(wrong)
claims = results / "replication" / "claims.csv"
assert claims.exists(), f"{claims} missing: the DAG did not reach its end"
print(f"gpu-check: {len(stores)} activation stores computed on CUDA in {want}; every stage ran")
EOF

echo "gpu-check 2/3 and 3/3: torch (CUDA) vs fused (CPU) statistics, bf16 extraction vs bare forward"
"$PYTHON" -m neuronatlas.bench extraction_gpu | tee "$WORK/extraction_gpu.json"
"$PYTHON" - "$WORK/extraction_gpu.json" <<'EOF'
import json
import sys

result = json.load(open(sys.argv[1]))
differences = {site: d for site, d in result["torch_vs_fused_differences"].items() if d}
assert not differences, f"the CUDA statistics differ from the CPU fused kernels: {differences}"
print(
    f"gpu-check: statistics agree; bf16 extraction {result['extraction_useful_tokens_per_s']:.0f} tokens/s vs bare forward "
    f"{result['bare_forward_useful_tokens_per_s']:.0f} tokens/s (ratio {result['ratio']}) on {result['device']}"
)
EOF
echo "gpu-check: passed (work folder $WORK)"

#!/usr/bin/env bash
# Wheels for the GPU machine, whose image has python3 3.12, torch, transformers, numpy,
# safetensors, pytest and most common packages but not the rest of what Stamen imports.
# Downloads into .whl/ (git-ignored through .git/info/exclude) exactly the packages that
# image lacks for: importing stamen, running swarm-host / swarm-bootstrap / the client over
# tcp, `pytest -m gpu tests/gpu`, and bitsandbytes with its CUDA 13.0 library.
#
#     bash scripts/device-wheels.sh          # then carry ".whl" in the device call
#
# It also writes .whl/REVISION (git describe); rerun it, or just that line, before a call.
#
# Not carried (already in the image): torch, transformers, numpy, safetensors, packaging,
# pytest (+ timeout, benchmark), huggingface-hub, typing-extensions, psutil, anyio.
# aiortc / webrtc is imported only for `--transport webrtc` (transports.factory), the API
# (litestar, uvicorn, orjson, llguidance) only by swarm-api, and gguf only for GGUF
# checkpoints: none of them is needed by the GPU suite, so none is carried.
#
# bitsandbytes' manylinux wheel holds one library per CUDA / ROCm / XPU release (~125 MB
# unpacked); the machine's torch is cu130, so the wheel is repacked with the CPU and
# CUDA 13.0 libraries only (bitsandbytes picks libbitsandbytes_cuda130.so from
# torch.version.cuda), which keeps the whole working tree under the call's 64 MiB.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=.whl
PYTHON=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude

# Versions as in the project's own environment, so the device runs what CI tests.
PACKAGES=(
    msgspec==0.23.0          # wire messages (protocol.wire)
    cryptography==50.0.2     # ed25519 identities, Noise handshake (transports)
    cffi==2.1.1              # cryptography's runtime dependency
    pycparser==3.12          # cffi's
    kademlia==2.2.3          # the DHT (protocol.discovery)
    rpcudp==5.0.1            # kademlia's
    u-msgpack-python==2.8.0  # rpcudp's
    pytest-asyncio==1.5.0    # pyproject sets asyncio_mode, which --strict-config checks
    bitsandbytes==0.50.2     # int8 / nf4 (models.quantization); repacked below
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64)

rm -rf "$DEST"
mkdir -p "$DEST"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platform_args[@]}" -d "$DEST" "${PACKAGES[@]}"

# Repack bitsandbytes: drop every native library but the CPU and CUDA 13.0 ones, and the
# RECORD lines naming them (pip checks the hashes of the files RECORD lists).
repack_bitsandbytes() {
    local wheel work
    wheel=$(ls "$DEST"/bitsandbytes-*.whl)
    work=$(mktemp -d)
    "$PYTHON" - "$wheel" "$work" <<'EOF'
import re, sys, zipfile
from pathlib import Path

wheel, work = Path(sys.argv[1]), Path(sys.argv[2])
keep = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
out = work / wheel.name
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        name = item.filename
        if name.endswith(".so") and not keep.search(name):
            continue
        data = src.read(name)
        if name.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(
                line for line in lines
                if not (line.split(",")[0].endswith(".so") and not keep.search(line.split(",")[0]))
            ).encode()
        dst.writestr(item, data)
print(f"bitsandbytes repacked: {wheel.stat().st_size >> 20} MiB -> {out.stat().st_size >> 20} MiB")
EOF
    mv "$work/$(basename "$wheel")" "$wheel"
    rmdir "$work"
}
repack_bitsandbytes

# The device's copy of the tree may have no .git: the suite prints this revision instead.
git describe --always --dirty >"$DEST/REVISION" 2>/dev/null || true
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1

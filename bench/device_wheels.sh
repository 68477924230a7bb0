#!/usr/bin/env bash
# Wheels the device machine (python 3.12, no registry) lacks for bench/gpu_check.py and bench/gpu_engine.py:
# pydantic and its needs, and pyyaml + pypdfium2 for the pipeline's model stage.
# Run here; it also copies the reference fixtures into .fixtures (../shared does not travel). Then carry `.whl` and
# `.fixtures` (both in .gitignore). See docs/model.md, "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.15.0 \
  pyyaml==6.0.3 pypdfium2==5.7.1
rm -rf .fixtures && cp -r "${PAGEMILL_FIXTURES:-../shared/fixtures/dsvl2-ref}" .fixtures && chmod -R u+w .fixtures
du -sh .whl .fixtures

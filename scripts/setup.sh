#!/usr/bin/env bash
# The one set-up command: a .venv at the repository root in which `import caffe` and `import fastsal`
# work, then the demo on the real open_nsfw model. Safe to rerun; a rerun with the cache takes seconds.
#
#   scripts/setup.sh [--cuda] [--no-demo]
#
#   --cuda     Caffe and fastsal with CUDA (CUDA toolkit needed; a GPU only to run it)
#   --no-demo  stop after installing
#
# Environment:
#   FASTSAL_VENV                 the virtual environment to create or reuse (default .venv)
#   PYTHON                       interpreter for .venv (default: Debian's /usr/bin/python3, whose
#                                Boost.Python pycaffe links against)
#   CAFFE_ROOT or Caffe_DIR      use your own Caffe build instead of building one (see README)
#   FASTSAL_CACHE                where the Caffe build and the demo model are cached (~/.cache/fastsal)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
run_demo=1
variant=cpu
for arg in "$@"; do
  case "$arg" in
    --no-demo) run_demo=0 ;;
    --cuda) variant=cuda ;;
    *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
venv=${FASTSAL_VENV:-.venv}
log() { echo "[setup] $*" >&2; }

python=${PYTHON:-/usr/bin/python3}
# fastsal's own apt needs (Caffe's are scripts/build_caffe.sh's): a venv, Python headers, and oneDNN
# for the fast convolution backward.
source scripts/apt_ensure.sh
apt_ensure python3-venv python3-dev libdnnl-dev clang-format  # clang-format: the style test
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv with $python"
  "$python" -m venv "$venv"
fi
venv_python=$root/$venv/bin/python
"$venv_python" -m pip install -q --upgrade pip
# What building Caffe's pycaffe and fastsal needs inside the venv (fastsal builds without isolation, so
# its CMake build directory is reused across reruns).
"$venv_python" -m pip install -q "numpy>=1.23" "scikit-build-core>=0.10" "pybind11>=2.12"

if [ -n "${Caffe_DIR:-}" ] || [ -n "${CAFFE_ROOT:-}" ]; then
  log "using your Caffe: ${Caffe_DIR:-$CAFFE_ROOT}"
  caffe_python=""
  for d in "${CAFFE_ROOT:-/nonexistent}/python" "${CAFFE_ROOT:-/nonexistent}/lib/python3/dist-packages"; do
    [ -f "$d/caffe/__init__.py" ] && caffe_python=$d
  done
else
  prefix=$(scripts/build_caffe.sh --python "$venv_python" $([ "$variant" = cuda ] && echo --cuda))
  export Caffe_DIR=$prefix/share/Caffe
  caffe_python=$prefix/lib/python3/dist-packages
fi
site=$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -n "$caffe_python" ]; then
  echo "$caffe_python" > "$site/fastsal-pycaffe.pth"  # `import caffe` inside the venv
fi

log "installing fastsal ($variant)"
caffe_define=()
[ -n "${Caffe_DIR:-}" ] && caffe_define=(-Ccmake.define.Caffe_DIR="$Caffe_DIR")
"$venv_python" -m pip install -q --no-build-isolation -Cbuild-dir="build/$variant" "${caffe_define[@]}" ".[demo,test]"
"$venv_python" -c 'import caffe, fastsal; print("[setup] fastsal", fastsal.__version__, fastsal.build_info())' >&2

if [ "$run_demo" = 1 ]; then
  "$venv_python" -m fastsal.demo --out out
fi

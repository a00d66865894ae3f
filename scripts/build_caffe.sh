#!/usr/bin/env bash
# Fetch, patch and build Caffe (libcaffe + pycaffe) from Debian's bullseye source package, and install
# it into a prefix cached outside the clone. Prints that prefix as its last line.
#
#   scripts/build_caffe.sh --python .venv/bin/python [--cuda]
#
# Environment:
#   FASTSAL_CACHE      cache root (default ~/.cache/fastsal); the prefix is caffe-<version>-<variant>-<hash>
#   FASTSAL_JOBS       parallel build jobs (default: nproc)
#   CUDA_ARCH_BIN      with --cuda: GPU architectures to compile for (default "75 80 86 89 90")
set -euo pipefail

CAFFE_VERSION=1.0.0+git20180821.99bd997-8
RECIPE_REVISION=1            # bump when a change here alters what gets built

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
patch_dir=$here/caffe-patches
python=python3
variant=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --python) python=$2; shift 2 ;;
    --cuda) variant=cuda; shift ;;
    *) echo "build_caffe.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
log() { echo "[build_caffe] $*" >&2; }

cache=${FASTSAL_CACHE:-$HOME/.cache/fastsal}
jobs=${FASTSAL_JOBS:-$(nproc)}
cuda_arch_bin=${CUDA_ARCH_BIN:-75 80 86 89 90}

# Build dependencies, installed only when missing so a cached rerun needs no network.
source "$here/apt_ensure.sh"
apt_ensure build-essential cmake dpkg-dev patch libboost-system-dev libboost-thread-dev \
  libboost-filesystem-dev libboost-python-dev libprotobuf-dev protobuf-compiler libgoogle-glog-dev \
  libgflags-dev libhdf5-dev libopenblas-dev python3-dev python3-venv

py_minor=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
py_tag=py$py_minor-np$("$python" -c 'import numpy; print(numpy.__version__.split(".")[0])')

cmake_options=(-DCMAKE_BUILD_TYPE=Release -DBLAS=Open -DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF -DUSE_LMDB=OFF
  -DUSE_HDF5=ON -DBUILD_docs=OFF -DBUILD_python=ON -DBUILD_python_layer=OFF -Dpython_version="$py_minor")
if [ "$variant" = cuda ]; then
  cmake_options+=(-DCPU_ONLY=OFF -DUSE_CUDNN=OFF -DCUDA_ARCH_NAME=Manual "-DCUDA_ARCH_BIN=$cuda_arch_bin"
    -DCUDA_ARCH_PTX=)
else
  cmake_options+=(-DCPU_ONLY=ON)
fi

patches=("$patch_dir"/*.patch)
[ "$variant" = cuda ] && patches+=("$patch_dir"/cuda/*.patch)  # CUDA 13 fixes touch only CUDA code
key=$( { echo "$CAFFE_VERSION $RECIPE_REVISION $variant $py_tag ${cmake_options[*]}"; cat "${patches[@]}"; } \
  | sha256sum | cut -c1-12)
prefix=$cache/caffe-${CAFFE_VERSION%%+*}-$variant-$key

if [ -f "$prefix/.complete" ]; then
  log "cached: $prefix"
  echo "$prefix"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/fastsal-caffe.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building Caffe $CAFFE_VERSION ($variant) in $work"

# A private deb-src list for bullseye on the mirror this machine already uses; the system's apt
# configuration is left untouched.
mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Identifier: Packages' 2>/dev/null \
  | grep -m1 -v -e security -e updates || true)
[ -n "$mirror" ] || { log "no Debian mirror found in the apt sources"; exit 1; }
mkdir -p "$work/apt/parts" "$work/apt/lists/partial"
cat > "$work/apt/parts/bullseye-src.sources" <<EOF
Types: deb-src
URIs: ${mirror%/}
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
apt_private=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/apt/parts"
  -o "Dir::State::Lists=$work/apt/lists")
apt-get "${apt_private[@]}" update -qq >&2
# apt checks the signed Release and the Sources hashes; dpkg-source checks the tarballs against the .dsc.
(cd "$work" && apt-get "${apt_private[@]}" source -qq "caffe=$CAFFE_VERSION" >&2)
src=$(find "$work" -maxdepth 1 -type d -name 'caffe-*' | head -n1)

for p in "${patches[@]}"; do
  log "applying $(basename "$p")"
  patch -d "$src" -p1 --forward --quiet < "$p"
done

# Install straight into the prefix (Caffe's CMake bakes it into rpaths); .complete marks it usable.
rm -rf "$prefix"
# (No registration of the throwaway build tree in ~/.cmake/packages, where other projects would find it.)
cmake -S "$src" -B "$work/build" -DCMAKE_INSTALL_PREFIX="$prefix" -DCMAKE_EXPORT_NO_PACKAGE_REGISTRY=ON \
  -DPYTHON_EXECUTABLE="$("$python" -c 'import sys; print(sys.executable)')" "${cmake_options[@]}" >&2
cmake --build "$work/build" -j "$jobs" >&2
cmake --install "$work/build" >&2
echo "$CAFFE_VERSION $variant ${cmake_options[*]}" > "$prefix/.complete"
log "installed: $prefix"
echo "$prefix"

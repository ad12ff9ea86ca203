#!/usr/bin/env bash
# Packaging check (CI runs it after the tests): build the wheel, install it (not editable) into
# a fresh venv that reuses the checkout's .venv packages (torch included: nothing is downloaded),
# and run a short `centerx train` from a directory outside the checkout.
#   bash scripts/check_wheel.sh            (after `bash run.sh test` has set up .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WORK/dist" . 2>/dev/null
python_bin="$(readlink -f "$PY")"
"$python_bin" -m venv "$WORK/venv"
# The fresh venv sees .venv's packages after its own; its own setuptools would shadow the
# newer one torch requires, so it goes.
"$WORK/venv/bin/pip" uninstall --quiet --yes setuptools
reuse="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$reuse" > "$site/centerx-reuse-checkout-venv.pth"
"$WORK/venv/bin/pip" install --quiet --no-index "$WORK"/dist/centerx-*.whl

cd "$WORK"  # outside the checkout: configs must come from the installed package
installed="$("$WORK/venv/bin/python" -c 'import centerx; print(centerx.__file__)')"
case "$installed" in "$WORK"/venv/*) ;; *) echo "centerx imported from $installed, not the wheel" >&2; exit 1 ;; esac
OMP_NUM_THREADS=1 "$WORK/venv/bin/centerx" train train.epochs=1 train.progress=false \
  data.train.num_images=16 data.val.num_images=4 data.num_workers=0 samples.count=1 \
  hydra.run.dir="$WORK/run" > "$WORK/train.log" 2>&1 || { tail -20 "$WORK/train.log" >&2; exit 1; }
test -f "$WORK/run/checkpoints/best.pt" && test -f "$WORK/run/eval.json"
echo "wheel check: installed $(basename "$WORK"/dist/centerx-*.whl) into a fresh venv; centerx train ran from $WORK"

# Shared by check.sh and engine.sh (sourced): unpacks the binaries of $BIN_DIR into
# $WORK/bin, finds the CUDA libraries they link and the driver's libcuda, and sets RUNENV (the
# env prefix to run them with) and, on CUDA, SMI_PID (an nvidia-smi sampler writing
# $WORK/smi.csv every 500 ms). Needs BIN_DIR, WORK, DEVICE, PY; BINARIES lists what must exist.
unpack_and_find_libs() {
for f in "$BIN_DIR"/*; do
  [ -f "$f" ] || continue
  case "$f" in
    *.xz) "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$WORK/bin/$(basename "$f" .xz)" ;;
    *) cp "$f" "$WORK/bin/" ;;
  esac
done
chmod +x "$WORK/bin"/* 2>/dev/null || true
ls -la "$WORK/bin"
for b in ${BINARIES:-parity bench}; do
  [ -x "$WORK/bin/$b" ] || echo "MISSING: $BIN_DIR has no $b binary"
done
RUNENV=(env)
if [ "$DEVICE" = cuda ]; then
  # Each library the binaries link, wherever torch's pip packages (or a system toolkit) put it.
  libdirs=""
  for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13; do
    p=$("$PY" - "$lib" <<'PYEOF' 2>/dev/null || true
import glob, os, sys, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for p in glob.glob(os.path.join(r, "nvidia", "**", sys.argv[1] + "*"), recursive=True):
        print(p); sys.exit()
PYEOF
)
    [ -n "$p" ] || p=$(timeout 60 find / -xdev -name "$lib*" -not -path '/proc/*' 2>/dev/null | head -1 || true)
    if [ -n "$p" ]; then
      echo "$lib: $p"
      d=$(dirname "$p"); case ":$libdirs:" in *":$d:"*) ;; *) libdirs="$libdirs:$d" ;; esac
    else
      echo "$lib: NOT FOUND"
    fi
  done
  LIBCUDA=${LIBCUDA:-$(ldconfig -p 2>/dev/null | awk '/libcuda.so.1 /{print $NF; exit}' || true)}
  [ -n "$LIBCUDA" ] || LIBCUDA=$(timeout 60 find / -xdev -name 'libcuda.so.1' -not -path '/proc/*' 2>/dev/null | head -1 || true)
  echo "libcuda: ${LIBCUDA:-NOT FOUND}"
  # The binaries record NEEDED libcuda.so.1 (benches/gpu/build.sh links the stub): the driver's
  # folder on the library path is enough.
  RUNENV=(env "LD_LIBRARY_PATH=${libdirs#:}:$(dirname "${LIBCUDA:-/x/x}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
  for b in ${BINARIES:-parity bench}; do
    [ -x "$WORK/bin/$b" ] && { "${RUNENV[@]}" ldd "$WORK/bin/$b" | grep -E 'not found|cublas|curand|nvrtc|cudart|libcuda' || true; }
  done
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 >"$WORK/smi.csv" 2>/dev/null &
  SMI_PID=$!
fi
}

# transformers `generate` (hf_bench.py) on checkpoint $2's page.png, $3 new tokens, batch sizes $4
# (comma-separated), within the time left: $OUT/$1.jsonl, and phase "$1" in $WORK/phases.txt for the
# GPU-busy summary. Needs say and cap (defined by the calling script), PY, DEVICE, DTYPE.
hf_phase() {
  local name=$1 ck=$2 new=$3 batches=$4 s rc=0 lim
  s=$(date +%s)
  lim=$(cap 100000)
  timeout "$lim" "$PY" benches/gpu/hf_bench.py "$ck" "$ck/page.png" "$new" --device "$DEVICE" --dtype "$DTYPE" \
    --batches "$batches" --budget-s $((lim - 10)) $([ "$DEVICE" = cpu ] && echo --threads "$(nproc)") \
    >>"$OUT/$name.jsonl" 2>"$OUT/$name.err" || rc=$?
  echo "$name all $s $(date +%s)" >>"$WORK/phases.txt"
  cat "$OUT/$name.jsonl"
  [ $rc = 0 ] || { say "transformers ($name) exit $rc"; grep -v Warning "$OUT/$name.err" | tail -5; }
}

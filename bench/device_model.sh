# Sourced by the device runs under bench/results/: the environment they run in, and `prepare_model`,
# which puts the working tree's package on the path (/tmp/shim) and converts the embedded GGUF (carried
# in two parts, /tmp/dev/gguf.part from an earlier call and .dev/b/gguf.part) into /tmp/model.
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/shim:/tmp/site CARTRIDGES_HOME=/tmp/home TQDM_DISABLE=1

prepare_model() {
  mkdir -p /tmp/shim/cartridges /tmp/home
  for f in cartridges/*.py; do ln -sf "$PWD/$f" /tmp/shim/cartridges/; done
  ln -sfn "$PWD/stages" /tmp/shim/cartridges/stages; ln -sfn "$PWD/pipeline" /tmp/shim/cartridges/pipeline
  cat /tmp/dev/gguf.part .dev/b/gguf.part > /tmp/smol.gguf
  sha256sum /tmp/smol.gguf | cut -c1-16
  python3 -c "
from pathlib import Path
from cartridges.models import _convert_gguf
out = Path('/tmp/model'); out.mkdir(exist_ok=True); _convert_gguf(Path('/tmp/smol.gguf'), out)
import transformers, peft, torch; print('transformers', transformers.__version__, 'peft', peft.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())
" 2>&1 | tail -3
}

#!/usr/bin/env bash
# ./setup.sh        fresh machine → .venv/ (pinned deps, the `camserve` command), both .mar archives,
#                   then TorchServe serving effnet_lite0 and effnet_lite0_embed on loopback, and one
#                   explained request to prove it.
# ./setup.sh stop   stops that TorchServe.
# Everything TorchServe writes (key_file.json with the tokens, logs, its pid file) is under logs/.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
WORK="$ROOT/logs"
mkdir -p "$WORK/tmp"
export TMPDIR="$WORK/tmp" TEMP="$WORK/tmp" LOG_LOCATION="$WORK" METRICS_LOCATION="$WORK"

if [ "${1:-}" = "stop" ]; then
  (cd "$WORK" && "$ROOT/.venv/bin/torchserve" --stop --foreground)
  exit 0
fi

./scripts/setup_env.sh

prop() { sed -n "s/^$1=//p" config.properties | tail -1; }
INFERENCE=$(prop inference_address)
MANAGEMENT=$(prop management_address)

if [ -f "$TMPDIR/.model_server.pid" ] && kill -0 "$(cat "$TMPDIR/.model_server.pid")" 2>/dev/null; then
  echo "TorchServe already running (pid $(cat "$TMPDIR/.model_server.pid")); ./setup.sh stop to stop it"
else
  (cd "$WORK" && exec nohup "$ROOT/.venv/bin/torchserve" --start --foreground --ncs \
      --ts-config "$ROOT/config.properties" --model-store "$ROOT/model_store" \
      --models effnet_lite0=effnet_lite0.mar effnet_lite0_embed=effnet_lite0_embed.mar) \
      > "$WORK/torchserve.out" 2>&1 < /dev/null &
  echo "TorchServe starting (output in logs/torchserve.out) ..."
fi

PHOTO=../shared/data/imagenet-samples/n01833805_hummingbird.JPEG
exec .venv/bin/python - "$WORK/key_file.json" "$INFERENCE" "$MANAGEMENT" "$PHOTO" <<'PY'
import io, json, os, sys, time
import requests
key_file, inference, management, photo = sys.argv[1:5]
deadline = time.time() + 600
keys = None
while time.time() < deadline:
    try:
        if keys is None and os.path.exists(key_file):
            data = json.load(open(key_file))
            keys = {api: data[api]["key"] for api in ("inference", "management")}
        if keys:
            auth = lambda api: {"Authorization": f"Bearer {keys[api]}"}
            if requests.get(f"{inference}/ping", headers=auth("inference"), timeout=5).json().get("status") == "Healthy":
                states = [w["status"] for m in ("effnet_lite0", "effnet_lite0_embed")
                          for w in requests.get(f"{management}/models/{m}", headers=auth("management"), timeout=5).json()[0]["workers"]]
                if states and all(s == "READY" for s in states):
                    break
    except (requests.RequestException, ValueError, KeyError, IndexError):
        pass
    time.sleep(2)
else:
    sys.exit("TorchServe did not become ready in 10 minutes; see logs/")
if os.path.exists(photo):
    image, source = open(photo, "rb").read(), photo
else:  # no shared photographs: a generated image (a bright disc on a dark background)
    from PIL import Image, ImageDraw
    canvas = Image.new("RGB", (320, 240), (20, 30, 40))
    ImageDraw.Draw(canvas).ellipse((110, 70, 210, 170), fill=(230, 180, 40))
    buffer = io.BytesIO(); canvas.save(buffer, format="JPEG"); image, source = buffer.getvalue(), "a generated image"
start = time.time()
response = requests.post(f"{inference}/predictions/effnet_lite0", headers={"Authorization": f"Bearer {keys['inference']}"},
                         files={"data": image, "explain": "1", "overlay": "1"}, timeout=300)  # the calibrated default
response.raise_for_status()
body = response.json()
e = body["explanation"]
print(f"\nTorchServe is serving effnet_lite0 and effnet_lite0_embed at {inference} (token auth on).")
print(f"Explained request with {source} in {time.time() - start:.2f} s:")
for p in body["predictions"][:3]:
    print(f"  {p['label']:<24} {p['score']:.3f}")
print(f"  explanation: {e['method']} at {e['layer']} (layer {e['layer_shape'][0]}x{e['layer_shape'][1]}), target {e['target']} "
      f"({e['labels'][0]}), heatmap PNG {len(e['heatmap']) * 3 // 4} bytes at {e['size'][0]}x{e['size'][1]}, "
      f"crop box {e['crop_box']}, passes {e['passes']}")
cal = e.get("calibration")
if cal:
    print(f"  calibrated (the archive's card, report half of {cal['n']} photographs): overall {cal['overall']:.3f}, "
          f"vs LayerCAM {cal['vs_layercam']:+.3f} ± {cal['sem']:.3f}")
print(f"\nInference key: {keys['inference']}  (logs/key_file.json)")
print(f"Try: curl -H \"Authorization: Bearer {keys['inference']}\" -F data=@{photo if os.path.exists(photo) else 'photo.jpg'} "
      f"-F explain=gradcam {inference}/predictions/effnet_lite0")
print("Stop with: ./setup.sh stop")
PY

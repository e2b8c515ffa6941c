"""Open URL in a fresh headless Chromium, type FILTER into the run page's "Search metrics" box, screenshot.

    .venv/bin/python docs/mlflow_ui/search_metrics_shot.py URL FILTER OUT.png WIDTH,HEIGHT

Chromium's --screenshot cannot type; this drives it over the DevTools protocol (websockets: in
the venv as an NNI dependency). Used for run_metrics.png (README.md here).
"""

import asyncio
import base64
import json
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

url, filt, out, size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
proc = subprocess.Popen(
    [
        "nice",
        "-n",
        "10",
        "chromium",
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-profile-')}",
        f"--window-size={size}",
        "--remote-debugging-port=9333",
        "about:blank",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
try:
    for _ in range(60):
        try:
            tabs = json.load(urllib.request.urlopen("http://127.0.0.1:9333/json"))
            page = next(t for t in tabs if t["type"] == "page")
            break
        except Exception:
            time.sleep(0.5)

    async def main():
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            n = 0

            async def call(method, **params):
                nonlocal n
                n += 1
                await ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("id") == n:
                        return msg

            await call("Page.enable")
            await call("Page.navigate", url=url)
            await asyncio.sleep(15)
            js = """(() => { const i = [...document.querySelectorAll('input')].find(e => e.placeholder === 'Search metrics');
              if (!i) return 'no input';
              const set = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
              set.call(i, %s); i.dispatchEvent(new Event('input', {bubbles: true})); return 'ok'; })()""" % json.dumps(
                filt
            )
            print(await call("Runtime.evaluate", expression=js, returnByValue=True))
            await asyncio.sleep(3)
            shot = await call("Page.captureScreenshot", format="png")
            open(out, "wb").write(base64.b64decode(shot["result"]["data"]))

    asyncio.run(main())
finally:
    proc.terminate()
    proc.wait()

"""Browser check of --mode=serve: headless Chromium opens the page, streams a video, screenshots it.

  apt-get install -y chromium chromium-driver        # Debian's browser and driver
  .venv/bin/pip install selenium==4.51.0
  .venv/bin/python -m scripts.browser_check --workdir=runs/default \
      [--frames=64] [--digit=3] [--seed=0] [--out=docs/serve_screenshot.png]

Starts `main.py --mode=serve` on a free loopback port as a child process, waits for the page,
picks the digit, starts the stream, waits for it to finish, presses "Save video", takes the
screenshot, and stops the server. Prints the time to first frame, the frames per second the page
showed (median of samples taken while frames arrive) against the sampler's own rate (frames per
second of generate, from the server's chunk timings), and the saved mp4's path. Not part of the
test suite: it needs the OS browser and a trained workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1000,620", "--hide-scrollbars")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_for_page(url: str, server: subprocess.Popen, timeout: float):
  """Poll until the server answers (it compiles the sampler step first)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if server.poll() is not None:
      raise SystemExit(f"the server exited with {server.returncode}; see its log")
    try:
      with urllib.request.urlopen(url, timeout=2) as r:
        if r.status == 200:
          return
    except OSError:
      time.sleep(1.0)
  raise SystemExit(f"no page at {url} after {timeout:.0f} s")


def make_driver(user_data_dir: str) -> webdriver.Chrome:
  options = webdriver.ChromeOptions()
  options.binary_location = "/usr/bin/chromium"
  for flag in CHROME_FLAGS:
    options.add_argument(flag)
  options.add_argument(f"--user-data-dir={user_data_dir}")
  return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def drive(driver, url: str, args) -> dict:
  """Start a stream on the page and measure it; returns the figures."""
  driver.get(url)
  wait = WebDriverWait(driver, 60)
  wait.until(lambda d: d.find_element(By.ID, "start").is_enabled())
  digits = driver.find_elements(By.CSS_SELECTOR, "#digits button")
  if digits:
    digits[args.digit].click()
  for field, value in (("seed", args.seed), ("length", args.frames)):
    box = driver.find_element(By.ID, field)
    box.clear()
    box.send_keys(str(value))
  driver.find_element(By.ID, "start").click()
  shown = []
  deadline = time.time() + args.run_timeout
  while time.time() < deadline:
    stats = driver.execute_script("return window.streamStats")
    if stats["framesShown"] >= 2 and not stats["done"]:
      shown.append(stats["fps"])
    if stats["done"]:
      break
    time.sleep(0.1)
  else:
    raise SystemExit(f"the stream did not finish within {args.run_timeout} s")
  driver.find_element(By.ID, "save").click()
  wait.until(lambda d: d.find_element(By.ID, "saved").is_displayed())
  stats = driver.execute_script("return window.streamStats")
  done = stats["done"]
  return {"time_to_first_frame_ms": round(stats["ttffMs"], 1),
          "shown_fps_median": round(statistics.median(shown), 1) if shown else None,
          "shown_fps_samples": len(shown),
          "sampler_fps": round(done["model_fps"], 1),
          "frames": done["frames"], "frames_shown": stats["framesShown"],
          "dropped": done["dropped"], "run_seconds": round(done["seconds"], 2),
          "status": driver.find_element(By.ID, "status").text,
          "saved": driver.find_element(By.ID, "saved").text}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained workdir (its checkpoint)")
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--frames", type=int, default=64)
  parser.add_argument("--digit", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_frames", type=int, default=128,
                      help="serve.max_frames: bounds the capacities compiled at start-up")
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "serve_screenshot.png"))
  parser.add_argument("--startup_timeout", type=float, default=900)
  parser.add_argument("--run_timeout", type=float, default=300)
  args = parser.parse_args()

  port = free_port()
  url = f"http://127.0.0.1:{port}/"
  log_path = os.path.join(tempfile.gettempdir(), f"browser_check_serve_{port}.log")
  with open(log_path, "w") as log:
    server = subprocess.Popen(
        [sys.executable, "main.py", "--mode=serve", f"--config={args.config}",
         f"--workdir={os.path.abspath(args.workdir)}", f"--config.serve.port={port}",
         f"--config.serve.max_frames={args.max_frames}", "--config.progress=false"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  try:
    t0 = time.time()
    wait_for_page(url, server, args.startup_timeout)
    print(f"server up after {time.time() - t0:.1f} s (log: {log_path})", flush=True)
    with tempfile.TemporaryDirectory(prefix="browser-check-") as profile:
      driver = make_driver(profile)
      try:
        figures = drive(driver, url, args)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        driver.save_screenshot(args.out)
      finally:
        driver.quit()
  finally:
    server.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on Ctrl-C
    try:
      server.wait(30)
    except subprocess.TimeoutExpired:
      server.kill()
  figures["screenshot"] = os.path.relpath(args.out, ROOT)
  print(json.dumps(figures, indent=2))


if __name__ == "__main__":
  main()

// relayd's side of the interop tests: tests/support/relayd_peer.py, run with the
// checkout's .venv/bin/python (or $RELAYD_PYTHON).

import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../../../", import.meta.url));
const PYTHON = process.env.RELAYD_PYTHON ?? `${ROOT}.venv/bin/python`;

/** Why the interop tests cannot run here, or false when they can. */
export const noPeer = existsSync(PYTHON) ? false : `no relayd Python at ${PYTHON}: run scripts/setup`;

/**
 * Run requests through relayd's code; returns the answers, in order.
 * @param {object[]} requests
 * @returns {any[]}
 */
export function relayd(requests) {
  const run = spawnSync(PYTHON, ["-m", "tests.support.relayd_peer"], {
    cwd: ROOT, input: JSON.stringify(requests), encoding: "utf8", timeout: 60_000,
  });
  if (run.status !== 0) throw new Error(`relayd_peer failed: ${run.stderr}`);
  return JSON.parse(run.stdout);
}

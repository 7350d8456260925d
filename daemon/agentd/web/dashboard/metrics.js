// What the page remembers of the daemon's state between views: finished tasks counted
// every few seconds (as the header refreshes its counters), after the daemon's own samples
// of the hour before (`/v1/tasks/throughput`), for the throughput chart.

const KEEP_MS = 60 * 60 * 1000;
const FINISHED = ["succeeded", "failed", "dead", "cancelled"];

/** [time in ms, tasks finished so far] samples, oldest first, of the last hour. */
export const samples = [];

/** Put the daemon's samples (`/v1/tasks/throughput`) from before this page's first in front. */
export function seed(history) {
  const first = samples.length ? samples[0][0] : Infinity;
  const older = history.samples.map(([seconds, finished]) => [seconds * 1000, finished])
    .filter(([time]) => time < first && Date.now() - time <= KEEP_MS);
  samples.unshift(...older);
}

/** Record tasks per status (as `/v1/tasks/counts` gives them) now. */
export function sample(byStatus) {
  const now = Date.now();
  const finished = FINISHED.reduce((sum, state) => sum + (byStatus[state] || 0), 0);
  samples.push([now, finished]);
  while (samples.length && now - samples[0][0] > KEEP_MS) samples.shift();
}

/** Tasks finished per second between consecutive samples: [time in ms, rate] pairs (a
 *  deletion makes the count drop; that interval counts as none finished). */
export function throughput() {
  const rates = [];
  for (let i = 1; i < samples.length; i += 1) {
    const [t0, n0] = samples[i - 1];
    const [t1, n1] = samples[i];
    rates.push([t1, Math.max(0, n1 - n0) / ((t1 - t0) / 1000)]);
  }
  return rates;
}

// What a device must remember between runs: its up `seq` counter, and which down seqs it
// has already handled (the edge delivers again whatever was not acknowledged).

/** How far below the highest down seq a late one is still told apart; as the relay's window. */
export const WINDOW = 1024;

/**
 * @typedef {object} Snapshot
 * @property {number} seq the last up seq used
 * @property {number} high the highest down seq handled
 * @property {number[]} seen the down seqs handled within WINDOW below `high`
 */

/** The counter and the window, with a `save` hook called after every change. */
export class DeviceState {
  /**
   * @param {{snapshot?: Snapshot, save?: (snapshot: Snapshot) => Promise<void> | void}} [options]
   */
  constructor({ snapshot = { seq: 0, high: 0, seen: [] }, save = () => {} } = {}) {
    this.seq = snapshot.seq;
    this.high = snapshot.high;
    this.seen = new Set(snapshot.seen);
    this.save = save;
  }

  /** The next up seq. It is saved before it is returned, so a restart never reuses it. */
  async nextSeq() {
    this.seq += 1;
    await this.save(this.snapshot());
    return this.seq;
  }

  /**
   * Whether down `seq` was handled already; a seq WINDOW or more below the highest counts
   * as handled (too old to tell, as the relay judges up seqs).
   * @param {number} seq
   */
  isSeen(seq) {
    return seq <= this.high - WINDOW || this.seen.has(seq);
  }

  /**
   * Record down `seq` as handled, and save.
   * @param {number} seq
   */
  async markSeen(seq) {
    this.seen.add(seq);
    if (seq > this.high) {
      this.high = seq;
      for (const old of this.seen) if (old <= this.high - WINDOW) this.seen.delete(old);
    }
    await this.save(this.snapshot());
  }

  /** @returns {Snapshot} */
  snapshot() {
    return { seq: this.seq, high: this.high, seen: [...this.seen] };
  }
}

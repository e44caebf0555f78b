// Mocha's spec reporter plus one plain closing line ("N passed, N failed, N skipped") that CI
// reads, and the counts appended to $TEST_SUMMARY_FILE for the overall total in test/run.sh.
// With $TEST_FILE_SECONDS set, each passing test file's wall time is merged into that JSON file: the
// lab runner balances its parallel shards with it (test/lab-shards.ts).
"use strict";
const Mocha = require("mocha");
const fs = require("fs");
const path = require("path");

class SummaryReporter extends Mocha.reporters.Spec {
  constructor(runner, options) {
    super(runner, options);
    const started = new Map();
    const seconds = {};
    runner.on("suite", (suite) => { if (suite.file && !started.has(suite.file)) started.set(suite.file, Date.now()); });
    const failed = new Set();
    // A file that failed stopped early: its time would mislead the next plan.
    runner.on("fail", (test) => { if (test.file) failed.add(path.basename(test.file)); });
    runner.on("suite end", (suite) => {
      if (suite.file && suite.parent && suite.parent.root) {
        const name = path.basename(suite.file);
        seconds[name] = (seconds[name] || 0) + Math.round((Date.now() - started.get(suite.file)) / 1000);
        started.delete(suite.file);
      }
    });
    runner.once("end", () => {
      const s = runner.stats || {};
      const line = `${s.passes || 0} passed, ${s.failures || 0} failed, ${s.pending || 0} skipped`;
      console.log(`\n${line}`);
      if (process.env.TEST_SUMMARY_FILE) fs.appendFileSync(process.env.TEST_SUMMARY_FILE, `${s.passes || 0} ${s.failures || 0} ${s.pending || 0}\n`);
      const file = process.env.TEST_FILE_SECONDS;
      if (file && Object.keys(seconds).length) {
        let all = {};
        try { all = JSON.parse(fs.readFileSync(file, "utf8")); } catch { /* first run */ }
        fs.mkdirSync(path.dirname(file), { recursive: true });
        for (const f of failed) delete seconds[f];
        fs.writeFileSync(`${file}.${process.pid}`, JSON.stringify({ ...all, ...seconds }, null, 2) + "\n");
        fs.renameSync(`${file}.${process.pid}`, file);
      }
    });
  }
}
module.exports = SummaryReporter;

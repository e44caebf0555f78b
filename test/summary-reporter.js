// Mocha's spec reporter plus one plain closing line ("N passed, N failed, N skipped") that CI
// reads, and the counts appended to $TEST_SUMMARY_FILE for the overall total in test/run.sh.
"use strict";
const Mocha = require("mocha");
const fs = require("fs");

class SummaryReporter extends Mocha.reporters.Spec {
  constructor(runner, options) {
    super(runner, options);
    runner.once("end", () => {
      const s = runner.stats || {};
      const line = `${s.passes || 0} passed, ${s.failures || 0} failed, ${s.pending || 0} skipped`;
      console.log(`\n${line}`);
      if (process.env.TEST_SUMMARY_FILE) fs.appendFileSync(process.env.TEST_SUMMARY_FILE, `${s.passes || 0} ${s.failures || 0} ${s.pending || 0}\n`);
    });
  }
}
module.exports = SummaryReporter;

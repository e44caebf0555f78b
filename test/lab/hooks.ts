// Root hooks of the lab-backed suite: boot one lab (S3 server + 3 hosts) for the whole run
// and stop it afterwards. If a lab part cannot start, every test fails with the reason.
import * as path from "path";
import { down, up, REPO } from "../../lab/lab";
import { setLab } from "./harness";

const dir = path.resolve(process.env.DBOXED_TEST_LAB_DIR ?? path.join(REPO, ".lab-test"));

export const mochaHooks = {
  async beforeAll(this: Mocha.Context) {
    this.timeout(3_600_000);
    await down(dir); // a lab left over by an interrupted run
    const t0 = Date.now();
    const lab = await up(dir, Number(process.env.DBOXED_TEST_HOSTS ?? "3"));
    process.stderr.write(`[test] lab up in ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
    setLab(lab);
  },
  async afterAll(this: Mocha.Context) {
    this.timeout(120_000);
    if (process.env.DBOXED_TEST_KEEP_LAB === "1") return;
    await down(dir);
  },
};

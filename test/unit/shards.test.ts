import { expect } from "chai";
import { plan } from "../lab-shards";

describe("lab shards", () => {
  it("gives the longest files out first, each to the shard with the least work", () => {
    const s = { "a.test.ts": 400, "b.test.ts": 300, "c.test.ts": 200, "d.test.ts": 150, "e.test.ts": 100 };
    expect(plan(Object.keys(s), s, 2)).to.deep.equal([["a.test.ts", "d.test.ts"], ["b.test.ts", "c.test.ts", "e.test.ts"]]);
  });
  it("runs every file exactly once, unknown ones counted at a default, and no empty shard", () => {
    const files = ["x.test.ts", "y.test.ts", "z.test.ts"];
    const p = plan(files, {}, 5);
    expect(p.flat().sort()).to.deep.equal(files);
    expect(p).to.have.length(3);
    expect(plan(files, {}, 1)).to.deep.equal([files]);
  });
});

import { expect } from "chai";
import { execFileSync } from "child_process";
import { command, quote } from "../../provider/host/shell";

const nasty = [
  `bar"";baz!$#^$'&*~*%)({}||\\/`,
  "", " ", "a b", "it's", "$(id)", "`id`", "x\ny", "-rf", "*", "~root", "ümläut 日本",
  "'", "''", "\\'", "a'b'c", "$HOME", "!!", "\t", ";", "&&", "|", ">out",
];

describe("shell quoting", () => {
  for (const s of nasty) {
    it(`round-trips ${JSON.stringify(s)} through a real sh`, () => {
      const out = execFileSync("sh", ["-c", `printf '%s' ${quote(s)}`]).toString();
      expect(out).to.equal(s);
    });
  }

  it("builds a command whose arguments arrive unchanged", () => {
    const argv = ["printf", "%s\\0", ...nasty];
    const out = execFileSync("sh", ["-c", command(argv)]).toString();
    expect(out.split("\0").slice(0, -1)).to.deep.equal(nasty);
  });

  it("leaves plain words bare and refuses NUL", () => {
    expect(quote("abc-1.2/x")).to.equal("abc-1.2/x");
    expect(() => quote("a\0b")).to.throw(/NUL/);
  });
});

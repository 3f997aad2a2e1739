// web/dco_shared.js: the hook helper every feature uses (`node --test tests/js/`). Its names are
// checked against the Python side in tests/test_web.py.
import { test } from "node:test";
import assert from "node:assert/strict";

import { chainMethod } from "../../web/dco_shared.js";

test("chainMethod runs the original first, with the same this and arguments, and keeps its result", () => {
  const calls = [];
  class Node {
    onExecuted(output) {
      calls.push(["original", this.id, output]);
      return "original result";
    }
  }
  chainMethod(Node, "onExecuted", function (output) {
    calls.push(["ours", this.id, output]);
    return "ignored";
  });
  const node = Object.assign(new Node(), { id: 7 });
  assert.equal(node.onExecuted({ images: [] }), "original result");
  assert.deepEqual(calls, [["original", 7, { images: [] }], ["ours", 7, { images: [] }]]);
});

test("chainMethod works when there is no original and when chained twice", () => {
  const order = [];
  class Node {}
  chainMethod(Node, "onRemoved", () => order.push("first"));
  chainMethod(Node, "onRemoved", () => order.push("second"));
  assert.equal(new Node().onRemoved(), undefined);
  assert.deepEqual(order, ["first", "second"]);
});

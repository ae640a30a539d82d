;; Guest faults: each export ends in a different trap.
(module
  (func (export "boom")
    unreachable)
  (func (export "div") (param i32 i32) (result i32)
    local.get 0 local.get 1 i32.div_s)
  (func $down (export "recurse") (param i32) (result i32)
    ;; unbounded recursion: exhausts the wasm stack
    local.get 0 i32.const 1 i32.add
    call $down
    i32.const 1 i32.add))

;; The example task of the README and the console's dispatch form: add(i32, i32) -> i32.
;;   dispatch it with function "add" and inputs "40 2"; the result is 42.
;; add.wasm next to it is this file compiled (wasmtime.wat2wasm); tests/console/test_units.py
;; checks that they match.
(module
  (func (export "add") (param $a i32) (param $b i32) (result i32)
    local.get $a
    local.get $b
    i32.add))

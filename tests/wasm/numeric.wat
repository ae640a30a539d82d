;; One export per value type, so input parsing and result formatting are tested for each.
(module
  (func (export "add64") (param i64 i64) (result i64)
    local.get 0 local.get 1 i64.add)
  (func (export "mul64f") (param f64 f64) (result f64)
    local.get 0 local.get 1 f64.mul)
  (func (export "div32f") (param f32 f32) (result f32)
    local.get 0 local.get 1 f32.div)
  (func (export "mixed") (param i32 i64 f32 f64) (result f64)
    ;; a sum over all four parameter types
    local.get 0 f64.convert_i32_s
    local.get 1 f64.convert_i64_s f64.add
    local.get 2 f64.promote_f32 f64.add
    local.get 3 f64.add)
  (func (export "divmod") (param i32 i32) (result i32 i32)
    ;; two results: "quotient,remainder"
    local.get 0 local.get 1 i32.div_s
    local.get 0 local.get 1 i32.rem_s)
  (func (export "nothing") (param i32))
  (func (export "takes_ref") (param externref) (result i32)
    i32.const 0))

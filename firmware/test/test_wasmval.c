/* Inputs to wasm values and values to the results string, against core/wasmvalues.py.
 * (tests/firmware/test_wire.py compares thousands more generated cases with the Python side.) */
#include <math.h>

#include "testing.h"

#include "../src/core/wasmval.h"

static void expect_format(wasm_value_t v, const char *expected)
{
    char out[64];
    assert_true(wasm_format_value(&v, out, sizeof out));
    assert_string_equal(out, expected);
}

static wasm_value_t f64(double x)
{
    wasm_value_t v = {WASM_TYPE_F64, {.f64 = x}};
    return v;
}

static wasm_value_t f32(float x)
{
    wasm_value_t v = {WASM_TYPE_F32, {.f32 = x}};
    return v;
}

static void formats_floats_as_the_shortest_round_trip(void **state)
{
    (void)state;
    expect_format(f64(0.1), "0.1");
    expect_format(f32(0.1f), "0.1");
    expect_format(f64(1.0 / 3.0), "0.3333333333333333");
    expect_format(f32(1.0f / 3.0f), "0.33333334");
    expect_format(f64(2.5e-8), "2.5e-08");
    expect_format(f64(1.5e300), "1.5e+300");
}

static void formats_integral_floats_without_a_fraction_below_1e16(void **state)
{
    (void)state;
    expect_format(f32(3.0f), "3");
    expect_format(f64(-0.0), "-0");
    expect_format(f64(9999999999999998.0), "9999999999999998");
    expect_format(f64(1e16), "1e+16");
}

static void formats_special_floats_and_integers(void **state)
{
    (void)state;
    expect_format(f64(NAN), "NaN");
    expect_format(f32(-INFINITY), "-inf");
    expect_format(f64(INFINITY), "inf");
    wasm_value_t i32 = {WASM_TYPE_I32, {.i32 = INT32_MIN}};
    expect_format(i32, "-2147483648");
    wasm_value_t i64 = {WASM_TYPE_I64, {.i64 = INT64_MAX}};
    expect_format(i64, "9223372036854775807");
}

static void joins_results_with_commas_and_reports_a_short_buffer(void **state)
{
    (void)state;
    wasm_value_t values[3] = {{WASM_TYPE_I32, {.i32 = 7}}, f32(0.1f), f64(-2.5)};
    char out[32];
    assert_true(wasm_format_results(values, 3, out, sizeof out));
    assert_string_equal(out, "7,0.1,-2.5");
    assert_true(wasm_format_results(values, 0, out, sizeof out));
    assert_string_equal(out, "");
    char tiny[6];
    assert_false(wasm_format_results(values, 3, tiny, sizeof tiny));
}

static void parses_integers_with_unsigned_wrap_and_range_checks(void **state)
{
    (void)state;
    wasm_value_t v;
    char err[200];
    assert_true(wasm_parse_input("4294967295", WASM_TYPE_I32, 0, &v, err, sizeof err));
    assert_int_equal(v.of.i32, -1);
    assert_true(wasm_parse_input(" -2147483648 ", WASM_TYPE_I32, 0, &v, err, sizeof err));
    assert_int_equal(v.of.i32, INT32_MIN);
    assert_true(wasm_parse_input("2147483648", WASM_TYPE_I32, 0, &v, err, sizeof err));
    assert_int_equal(v.of.i32, INT32_MIN);
    assert_true(wasm_parse_input("18446744073709551615", WASM_TYPE_I64, 0, &v, err, sizeof err));
    assert_int_equal(v.of.i64, -1);
    assert_true(wasm_parse_input("+007", WASM_TYPE_I64, 0, &v, err, sizeof err));
    assert_int_equal(v.of.i64, 7);

    assert_false(wasm_parse_input("-2147483649", WASM_TYPE_I32, 1, &v, err, sizeof err));
    assert_string_equal(err, "input 1 ('-2147483649') does not fit in i32");
    assert_false(wasm_parse_input("18446744073709551616", WASM_TYPE_I64, 0, &v, err, sizeof err));
    assert_string_equal(err, "input 0 ('18446744073709551616') does not fit in i64");
    assert_false(wasm_parse_input("1.5", WASM_TYPE_I32, 1, &v, err, sizeof err));
    assert_string_equal(err, "input 1 ('1.5') is not an integer, but the parameter is i32");
    assert_false(wasm_parse_input("it's", WASM_TYPE_I32, 1, &v, err, sizeof err));
    assert_string_equal(err, "input 1 (\"it's\") is not an integer, but the parameter is i32");
    assert_false(wasm_parse_input("", WASM_TYPE_I32, 2, &v, err, sizeof err));
    assert_string_equal(err, "input 2 ('') is not an integer, but the parameter is i32");
}

static void parses_floats_like_python(void **state)
{
    (void)state;
    wasm_value_t v;
    char err[200];
    assert_true(wasm_parse_input(".5", WASM_TYPE_F64, 0, &v, err, sizeof err));
    assert_true(v.of.f64 == 0.5);
    assert_true(wasm_parse_input("5.", WASM_TYPE_F64, 0, &v, err, sizeof err));
    assert_true(v.of.f64 == 5.0);
    assert_true(wasm_parse_input("1e400", WASM_TYPE_F32, 0, &v, err, sizeof err));
    assert_true(isinf(v.of.f32) && v.of.f32 > 0);
    assert_true(wasm_parse_input("3.4028235e38", WASM_TYPE_F32, 0, &v, err, sizeof err));
    assert_true(v.of.f32 == 3.4028234663852886e+38f);
    assert_true(wasm_parse_input("3.5e38", WASM_TYPE_F32, 0, &v, err, sizeof err));
    assert_true(isinf(v.of.f32));
    assert_true(wasm_parse_input("+Infinity", WASM_TYPE_F64, 0, &v, err, sizeof err));
    assert_true(isinf(v.of.f64) && v.of.f64 > 0);
    assert_true(wasm_parse_input("-NaN", WASM_TYPE_F32, 0, &v, err, sizeof err));
    assert_true(isnan(v.of.f32));

    assert_false(wasm_parse_input("1e", WASM_TYPE_F64, 1, &v, err, sizeof err));
    assert_string_equal(err, "input 1 ('1e') is not a number, but the parameter is f64");
    assert_false(wasm_parse_input("0x10", WASM_TYPE_F64, 1, &v, err, sizeof err));
    assert_false(wasm_parse_input("a\"b", WASM_TYPE_F64, 1, &v, err, sizeof err));
    assert_string_equal(err, "input 1 ('a\"b') is not a number, but the parameter is f64");
    assert_false(wasm_parse_input("x", WASM_TYPE_V128, 1, &v, err, sizeof err));
    assert_string_equal(err, "parameter 1 has type v128, which a task input cannot provide");
}

static void repr_escapes_like_python(void **state)
{
    (void)state;
    char out[64];
    wasm_py_repr("a\tb\n\\", out, sizeof out);
    assert_string_equal(out, "'a\\tb\\n\\\\'");
    wasm_py_repr("both ' and \"", out, sizeof out);
    assert_string_equal(out, "'both \\' and \"'");
    wasm_py_repr("\x01\x7f", out, sizeof out);
    assert_string_equal(out, "'\\x01\\x7f'");
    char tiny[5];
    wasm_py_repr("abcdefgh", tiny, sizeof tiny);
    assert_int_equal(strlen(tiny), 4);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(formats_floats_as_the_shortest_round_trip),
        cmocka_unit_test(formats_integral_floats_without_a_fraction_below_1e16),
        cmocka_unit_test(formats_special_floats_and_integers),
        cmocka_unit_test(joins_results_with_commas_and_reports_a_short_buffer),
        cmocka_unit_test(parses_integers_with_unsigned_wrap_and_range_checks),
        cmocka_unit_test(parses_floats_like_python),
        cmocka_unit_test(repr_escapes_like_python),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

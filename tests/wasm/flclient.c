/* WASI command: a federated-learning client, one local training round of y = w.x + b.
 *
 * Reads ROUND_ID, PROPLET_ID, MODEL_URI, HYPERPARAMS ({"lr":0.1,"epochs":1}), MODEL_DATA
 * ({"w":[...],"b":...}; missing or empty: zeros) and DATASET_DATA ({"x":[[...],...],"y":[...]};
 * missing: a small built-in set). Runs `epochs` full-batch gradient steps on the mean squared error
 * and prints one JSON line: the update, the rows it learnt from and the loss before training.
 * Numbers are printed with %.17g so the tests can recompute them exactly.
 *
 * No JSON library exists for wasi-libc: a key is found by its quoted name and numbers are read with
 * strtod, which is enough for the flat documents above. Exit 2 on input it cannot read. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 1024
#define MAX_DIM 32

static const char BUILTIN_DATASET[] =
    "{\"x\": [[1, 2], [2, 1], [3, 4], [4, 3], [5, 5], [0.5, -1]],"
    " \"y\": [5.5, 4.5, 11.5, 10.5, 15.5, -0.75]}";

static double x[MAX_ROWS][MAX_DIM];
static double y[MAX_ROWS];
static double w[MAX_DIM];

static void fail(const char *what) {
    fprintf(stderr, "flclient: %s\n", what);
    exit(2);
}

static const char *skip_space(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') p++;
    return p;
}

/* The position just after `"key":` in json, or NULL. */
static const char *find_key(const char *json, const char *key) {
    size_t len = strlen(key);
    for (const char *p = strchr(json, '"'); p != NULL; p = strchr(p + 1, '"')) {
        if (strncmp(p + 1, key, len) == 0 && p[len + 1] == '"') {
            const char *after = skip_space(p + len + 2);
            if (*after == ':') return skip_space(after + 1);
        }
    }
    return NULL;
}

/* Reads `[n, n, ...]` at p into out (at most max numbers); returns the position after `]`. */
static const char *read_numbers(const char *p, double *out, int max, int *count) {
    p = skip_space(p);
    if (*p != '[') return NULL;
    p = skip_space(p + 1);
    *count = 0;
    if (*p == ']') return p + 1;
    for (;;) {
        char *end;
        double value = strtod(p, &end);
        if (end == p || *count == max) return NULL;
        out[(*count)++] = value;
        p = skip_space(end);
        if (*p == ']') return p + 1;
        if (*p != ',') return NULL;
        p = skip_space(p + 1);
    }
}

static double number_or(const char *json, const char *key, double fallback) {
    const char *p = json ? find_key(json, key) : NULL;
    if (p == NULL) return fallback;
    char *end;
    double value = strtod(p, &end);
    return end == p ? fallback : value;
}

/* Fills x and y from {"x": [[...], ...], "y": [...]}; returns the row count, sets *dim. */
static int read_dataset(const char *json, int *dim) {
    const char *p = find_key(json, "x");
    if (p == NULL || *p != '[') fail("DATASET_DATA has no \"x\" array of rows");
    p = skip_space(p + 1);
    int rows = 0;
    *dim = -1;
    while (*p != ']') {
        int count;
        if (rows == MAX_ROWS) fail("DATASET_DATA has too many rows");
        p = read_numbers(p, x[rows], MAX_DIM, &count);
        if (p == NULL) fail("DATASET_DATA has a row that is not a list of at most 32 numbers");
        if (*dim >= 0 && count != *dim) fail("DATASET_DATA has rows of different lengths");
        *dim = count;
        rows++;
        p = skip_space(p);
        if (*p == ',') p = skip_space(p + 1);
        else if (*p != ']') fail("DATASET_DATA's \"x\" is not a list of rows");
    }
    int labels;
    p = find_key(json, "y");
    if (p == NULL || read_numbers(p, y, MAX_ROWS, &labels) == NULL) fail("DATASET_DATA has no \"y\" list");
    if (rows == 0 || labels != rows) fail("DATASET_DATA needs as many \"y\" values as \"x\" rows, at least one");
    return rows;
}

static double predict(const double *row, int dim, double b) {
    double sum = 0.0;
    for (int j = 0; j < dim; j++) sum += w[j] * row[j];
    return sum + b;
}

static double mean_squared_error(int rows, int dim, double b) {
    double sum = 0.0;
    for (int i = 0; i < rows; i++) {
        double err = predict(x[i], dim, b) - y[i];
        sum += err * err;
    }
    return sum / rows;
}

static void print_string(const char *s) {
    putchar('"');
    for (; s != NULL && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

int main(void) {
    const char *dataset = getenv("DATASET_DATA");
    const char *model = getenv("MODEL_DATA");
    const char *hyper = getenv("HYPERPARAMS");
    int dim;
    int rows = read_dataset(dataset && *dataset ? dataset : BUILTIN_DATASET, &dim);

    double b = 0.0;
    const char *weights = model && *model ? find_key(model, "w") : NULL;
    if (weights != NULL) {
        int count;
        if (read_numbers(weights, w, MAX_DIM, &count) == NULL || count != dim)
            fail("MODEL_DATA's \"w\" is not a list of as many numbers as a dataset row has");
        b = number_or(model, "b", 0.0);
    }
    double lr = number_or(hyper, "lr", 0.1);
    int epochs = (int)number_or(hyper, "epochs", 1);

    double loss = mean_squared_error(rows, dim, b);
    for (int epoch = 0; epoch < epochs; epoch++) {
        double grad_w[MAX_DIM] = {0};
        double grad_b = 0.0;
        for (int i = 0; i < rows; i++) {
            double err = predict(x[i], dim, b) - y[i];
            for (int j = 0; j < dim; j++) grad_w[j] += err * x[i][j];
            grad_b += err;
        }
        for (int j = 0; j < dim; j++) w[j] -= lr * (2.0 / rows) * grad_w[j];
        b -= lr * (2.0 / rows) * grad_b;
    }
    /* Checked before printing: JSON has no NaN or infinity, and half a line is worse than none. */
    int finite = isfinite(loss) && isfinite(b);
    for (int j = 0; j < dim; j++) finite = finite && isfinite(w[j]);
    if (!finite) fail("training diverged (a number is not finite); lower \"lr\" in HYPERPARAMS");

    printf("{\"round_id\":");
    print_string(getenv("ROUND_ID"));
    printf(",\"proplet_id\":");
    print_string(getenv("PROPLET_ID"));
    printf(",\"base_model_uri\":");
    print_string(getenv("MODEL_URI"));
    printf(",\"num_samples\":%d,\"metrics\":{\"loss\":%.17g},\"update\":{\"w\":[", rows, loss);
    for (int j = 0; j < dim; j++) printf("%s%.17g", j ? "," : "", w[j]);
    printf("],\"b\":%.17g}}\n", b);
    return 0;
}

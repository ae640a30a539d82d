/* WASI command for filesystem tests:
 *   read PATH         prints the file's content
 *   write PATH TEXT   creates or replaces the file
 *   list DIR          prints one entry per line
 * Failures print "error: <op> <path>: <strerror>" on stderr and exit with 2. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

static int fail(const char *op, const char *path) {
    fprintf(stderr, "error: %s %s: %s\n", op, path, strerror(errno));
    return 2;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "read") == 0) {
        FILE *f = fopen(argv[2], "r");
        if (!f) return fail("read", argv[2]);
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
        fclose(f);
        return 0;
    }
    if (argc >= 4 && strcmp(argv[1], "write") == 0) {
        FILE *f = fopen(argv[2], "w");
        if (!f) return fail("write", argv[2]);
        fputs(argv[3], f);
        if (fclose(f) != 0) return fail("write", argv[2]);
        printf("wrote %s\n", argv[2]);
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "list") == 0) {
        DIR *d = opendir(argv[2]);
        if (!d) return fail("list", argv[2]);
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) printf("%s\n", e->d_name);
        }
        closedir(d);
        return 0;
    }
    fprintf(stderr, "usage: fsio read PATH | write PATH TEXT | list DIR\n");
    return 64;
}

/* WASI command: echoes argv and the GREETING variable on stdout.
 * --stderr=TEXT writes TEXT to stderr, --exit=N exits with status N. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    const char *greeting = getenv("GREETING");
    int status = 0;
    printf("argv:");
    for (int i = 0; i < argc; i++) printf(" [%s]", argv[i]);
    printf("\nGREETING=%s\n", greeting ? greeting : "(unset)");
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--exit=", 7) == 0) status = atoi(argv[i] + 7);
        else if (strncmp(argv[i], "--stderr=", 9) == 0) fprintf(stderr, "%s\n", argv[i] + 9);
    }
    return status;
}

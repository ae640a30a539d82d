/* Provisioning for the host proplet: the device's serial line protocol (core/provision.c) on a
 * tty or pseudo-terminal, with a settings file standing in for NVS. `propeller firmware
 * provision` talks to this exactly as it talks to a board.
 */
#define _DEFAULT_SOURCE /* cfmakeraw */
#define _XOPEN_SOURCE 600 /* posix_openpt, grantpt, unlockpt, ptsname */

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "host.h"

struct provision_tty {
    int fd;
    char link[512]; /* symlink to the pty's terminal end, removed at stop */
    char settings_path[512];
    proplet_settings_t settings;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    bool reboot;
    bool stopping;
};

bool settings_load(const char *path, proplet_settings_t *settings)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return false;
    char line[PROVISION_LINE_MAX];
    while (fgets(line, sizeof line, f) != NULL)
        settings_parse_line(settings, line);
    fclose(f);
    return true;
}

bool settings_save(const char *path, const proplet_settings_t *settings, char *err, size_t err_len)
{
    /* Write a new file and rename it over the old one: a crash never leaves half a file. */
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (f == NULL) {
        snprintf(err, err_len, "cannot write %s: %s", tmp, strerror(errno));
        if (fd >= 0)
            close(fd);
        return false;
    }
    proplet_settings_t copy = *settings;
    for (size_t i = 0; i < settings_key_count; i++)
        fprintf(f, "%s=%s\n", settings_keys[i].name, settings_value(&copy, &settings_keys[i]));
    bool ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        snprintf(err, err_len, "cannot write %s: %s", path, strerror(errno));
        unlink(tmp);
        return false;
    }
    return true;
}

static void write_all(int fd, const char *text)
{
    size_t len = strlen(text);
    while (len > 0) {
        ssize_t n = write(fd, text, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        text += n;
        len -= (size_t)n;
    }
}

static void handle_line(provision_tty_t *tty, const char *line)
{
    char reply[1024];
    provision_action_t action = provision_handle_line(&tty->settings, false, line, reply, sizeof reply);
    if (action == PROVISION_SAVE) {
        char err[300];
        if (settings_save(tty->settings_path, &tty->settings, err, sizeof err))
            snprintf(reply, sizeof reply, "+OK saved\n");
        else
            snprintf(reply, sizeof reply, "+ERR %s\n", err);
    }
    write_all(tty->fd, reply);
    if (action == PROVISION_REBOOT) {
        pthread_mutex_lock(&tty->lock);
        tty->reboot = true;
        pthread_cond_broadcast(&tty->changed);
        pthread_mutex_unlock(&tty->lock);
    }
}

static void *serve(void *arg)
{
    provision_tty_t *tty = arg;
    char line[PROVISION_LINE_MAX + 1];
    size_t len = 0;
    bool overflow = false;
    for (;;) {
        pthread_mutex_lock(&tty->lock);
        bool stopping = tty->stopping;
        pthread_mutex_unlock(&tty->lock);
        if (stopping)
            return NULL;
        struct pollfd pfd = {tty->fd, POLLIN, 0};
        int ready = poll(&pfd, 1, 200);
        if (ready > 0 && (pfd.revents & (POLLHUP | POLLERR)) && !(pfd.revents & POLLIN)) {
            /* Nobody has the terminal end of our pty open: wait for a client. */
            struct timespec pause = {0, 100 * 1000000L};
            nanosleep(&pause, NULL);
            continue;
        }
        if (ready <= 0 || !(pfd.revents & POLLIN))
            continue;
        char chunk[128];
        ssize_t n = read(tty->fd, chunk, sizeof chunk);
        if (n <= 0) {
            /* The other end of a pty closed; wait for the next one to open it. */
            struct timespec pause = {0, 100 * 1000000L};
            nanosleep(&pause, NULL);
            continue;
        }
        for (ssize_t i = 0; i < n; i++) {
            char c = chunk[i];
            if (c == '\n' || c == '\r') {
                if (overflow)
                    write_all(tty->fd, "+ERR line too long\n");
                else if (len > 0) {
                    line[len] = '\0';
                    handle_line(tty, line);
                }
                len = 0;
                overflow = false;
            } else if (len < PROVISION_LINE_MAX) {
                line[len++] = c;
            } else {
                overflow = true;
            }
        }
    }
}

static provision_tty_t *serve_fd(int fd, const char *what, const char *settings_path, char *err,
                                 size_t err_len)
{
    provision_tty_t *tty = calloc(1, sizeof *tty);
    if (tty == NULL) {
        snprintf(err, err_len, "out of memory");
        close(fd);
        return NULL;
    }
    tty->fd = fd;
    struct termios raw;
    if (tcgetattr(fd, &raw) == 0) {
        /* Like the device's UART: no echo, no line editing, bytes as they come. */
        cfmakeraw(&raw);
        tcsetattr(fd, TCSANOW, &raw);
    }
    snprintf(tty->settings_path, sizeof tty->settings_path, "%s", settings_path);
    settings_load(settings_path, &tty->settings);
    pthread_mutex_init(&tty->lock, NULL);
    pthread_cond_init(&tty->changed, NULL);
    if (pthread_create(&tty->thread, NULL, serve, tty) != 0) {
        snprintf(err, err_len, "cannot start the provisioning thread");
        close(fd);
        free(tty);
        return NULL;
    }
    host_log(PROPLET_LOG_INFO, "provisioning on %s (settings in %s)", what, settings_path);
    return tty;
}

provision_tty_t *provision_tty_start(const char *path, const char *settings_path, char *err,
                                     size_t err_len)
{
    int fd = open(path, O_RDWR | O_NOCTTY);
    if (fd < 0) {
        snprintf(err, err_len, "cannot open %s for provisioning: %s", path, strerror(errno));
        return NULL;
    }
    return serve_fd(fd, path, settings_path, err, err_len);
}

provision_tty_t *provision_pty_start(const char *link, const char *settings_path, char *err,
                                     size_t err_len)
{
    /* We hold the pty's controller side, as the device holds its UART; clients open the
     * terminal side through the symlink, as they open /dev/ttyUSB0. */
    int fd = posix_openpt(O_RDWR | O_NOCTTY);
    if (fd < 0 || grantpt(fd) != 0 || unlockpt(fd) != 0 || ptsname(fd) == NULL) {
        snprintf(err, err_len, "cannot create a pseudo-terminal: %s", strerror(errno));
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    const char *terminal = ptsname(fd);
    unlink(link);
    if (symlink(terminal, link) != 0) {
        snprintf(err, err_len, "cannot link %s to %s: %s", link, terminal, strerror(errno));
        close(fd);
        return NULL;
    }
    char what[600];
    snprintf(what, sizeof what, "%s (%s)", link, terminal);
    provision_tty_t *tty = serve_fd(fd, what, settings_path, err, err_len);
    if (tty == NULL)
        unlink(link);
    else
        snprintf(tty->link, sizeof tty->link, "%s", link);
    return tty;
}

bool provision_tty_wait_reboot(provision_tty_t *tty, unsigned timeout_ms)
{
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&tty->lock);
    while (!tty->reboot && !tty->stopping)
        if (pthread_cond_timedwait(&tty->changed, &tty->lock, &deadline) != 0)
            break;
    bool reboot = tty->reboot;
    tty->reboot = false;
    pthread_mutex_unlock(&tty->lock);
    return reboot;
}

void provision_tty_stop(provision_tty_t *tty)
{
    if (tty == NULL)
        return;
    pthread_mutex_lock(&tty->lock);
    tty->stopping = true;
    pthread_cond_broadcast(&tty->changed);
    pthread_mutex_unlock(&tty->lock);
    pthread_join(tty->thread, NULL);
    close(tty->fd);
    if (tty->link[0] != '\0')
        unlink(tty->link);
    pthread_cond_destroy(&tty->changed);
    pthread_mutex_destroy(&tty->lock);
    free(tty);
}

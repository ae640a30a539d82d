/* Settings in NVS, written over the serial console by the provisioning line protocol
 * (core/provision.h) that `propeller firmware provision` speaks. Every key of settings_keys is one
 * NVS string of the same name (at most 15 characters), trusted_keys included. */
#include <stdio.h>
#include <string.h>

#include "driver/uart.h"
#include "esp_log.h"
#include "esp_system.h"
#include "freertos/FreeRTOS.h"
#include "freertos/task.h"
#include "nvs.h"
#include "nvs_flash.h"
#include "sdkconfig.h"

#include "device.h"

#define NVS_NAMESPACE "proplet"
#define CONSOLE_UART CONFIG_ESP_CONSOLE_UART_NUM
#define PROVISION_STACK_BYTES 6144

static const char *TAG = "provision";

bool settings_nvs_load(proplet_settings_t *settings)
{
    memset(settings, 0, sizeof *settings);
    nvs_handle_t nvs;
    /* A device never provisioned has no namespace yet: empty settings. */
    if (nvs_open(NVS_NAMESPACE, NVS_READONLY, &nvs) != ESP_OK)
        return false;
    for (size_t i = 0; i < settings_key_count; i++) {
        size_t len = settings_keys[i].size;
        char *field = settings_value(settings, &settings_keys[i]);
        if (nvs_get_str(nvs, settings_keys[i].name, field, &len) != ESP_OK)
            field[0] = '\0';
    }
    nvs_close(nvs);
    return true;
}

bool settings_nvs_save(const proplet_settings_t *settings, char *err, size_t err_len)
{
    nvs_handle_t nvs;
    esp_err_t rc = nvs_open(NVS_NAMESPACE, NVS_READWRITE, &nvs);
    proplet_settings_t copy = *settings;
    for (size_t i = 0; rc == ESP_OK && i < settings_key_count; i++)
        rc = nvs_set_str(nvs, settings_keys[i].name, settings_value(&copy, &settings_keys[i]));
    if (rc == ESP_OK)
        rc = nvs_commit(nvs);
    nvs_close(nvs);
    if (rc != ESP_OK)
        snprintf(err, err_len, "could not write the settings to flash (%s)", esp_err_to_name(rc));
    return rc == ESP_OK;
}

static void reply(const char *text)
{
    uart_write_bytes(CONSOLE_UART, text, strlen(text));
}

static void handle_line(proplet_settings_t *settings, const char *line)
{
    char answer[1024];
    provision_action_t action = provision_handle_line(settings, true, line, answer, sizeof answer);
    if (action == PROVISION_SAVE) {
        char err[160];
        if (settings_nvs_save(settings, err, sizeof err))
            snprintf(answer, sizeof answer, "+OK saved\n");
        else
            snprintf(answer, sizeof answer, "+ERR %s\n", err);
    }
    reply(answer);
    if (action == PROVISION_REBOOT) {
        uart_wait_tx_done(CONSOLE_UART, pdMS_TO_TICKS(500));
        esp_restart();
    }
}

static void serve(void *unused)
{
    (void)unused;
    static proplet_settings_t settings;
    settings_nvs_load(&settings);
    char line[PROVISION_LINE_MAX + 1];
    size_t len = 0;
    bool overflow = false;
    for (;;) {
        uint8_t chunk[64];
        int n = uart_read_bytes(CONSOLE_UART, chunk, sizeof chunk, pdMS_TO_TICKS(100));
        for (int i = 0; i < n; i++) {
            char c = (char)chunk[i];
            if (c == '\n' || c == '\r') {
                if (overflow)
                    reply("+ERR line too long\n");
                else if (len > 0) {
                    line[len] = '\0';
                    handle_line(&settings, line);
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

void provisioning_start(void)
{
    if (!uart_is_driver_installed(CONSOLE_UART)
        && uart_driver_install(CONSOLE_UART, 1024, 0, 0, NULL, 0) != ESP_OK) {
        ESP_LOGE(TAG, "cannot read the console UART: provisioning is unavailable");
        return;
    }
    xTaskCreate(serve, "provision", PROVISION_STACK_BYTES, NULL, 5, NULL);
}
